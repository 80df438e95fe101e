"""Tuning sweep of the split-path GroupNorm kernels: tile size, warps, pipelining depth, grid size.

Each variant patches the launch planner's constants (``medgn.ops.group_norm_plan``): elements per
tile (``_TILE_GPU``), warps per program (``_warps``), software-pipelining stages (``_STAGES``) and
how many programs the grid may hold (``waves`` x the one-wave count of ``_device_limits``). For
each shape it times, with the CUDA-event timer of ``bench_group_norm`` (queued calls, L2 flushed
between samples, median):

- ``fwd``: ``group_norm_forward`` on the split path (statistics kernel + apply kernel);
- ``stats``: the same call with the apply kernel skipped, so ``fwd - stats`` is the apply kernel;
- ``bwd``: ``group_norm_backward`` on the split path (reduce kernel + dx kernel);
- ``reduce``: the same with the dx kernel skipped.

and checks the full forward's y and backward's dx of every variant against float64 (relative L2
error, ``bench_group_norm.CHECK_TOL``). GB/s count the bytes each kernel must move (stats: x;
apply: x + y; reduce: x + dy; dx: x + dy + dx). Kernels are compiled first in parallel worker
processes (Triton's disk cache), so the sweep's wall time is not one compile after another.

It also measures the host side of one autograd call (forward + backward through the custom ops)
at a small, launch-bound level: host microseconds per call against the GPU's, and a cProfile of
those calls (``host_profile.txt``).

Results: ``<out>/group_norm_tune_<device>.json``. ``--device cpu`` is a smoke run (Triton's
interpreter, tiny shapes, two variants) that checks the script; its timings mean nothing.

Usage: ``python benchmarks/tune_group_norm.py [--device cuda|cpu] [--out DIR] [--jobs N]``
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# (shape, layout) at bf16 with the model's group rule: the 128^3 level (both layouts) and the
# 64^3 level of the U-Net at batch 2.
GPU_SHAPES = [((2, 32, 128, 128, 128), "contiguous"), ((2, 32, 128, 128, 128), "channels_last"),
              ((2, 64, 64, 64, 64), "channels_last")]  # fmt: skip
CPU_SHAPES = [((2, 8, 6, 6, 6), "contiguous"), ((2, 8, 6, 6, 6), "channels_last")]
# (tile elements, warps or None for the planner's rule, stages, waves). The first is the default.
VARIANTS = [
    (2048, None, 3, 1),
    (1024, None, 3, 1), (4096, None, 3, 1), (8192, None, 3, 1),
    (2048, 4, 3, 1), (2048, 16, 3, 1),
    (2048, None, 1, 1), (2048, None, 2, 1), (2048, None, 4, 1),
    (2048, None, 3, 2), (2048, None, 3, 4),
    (4096, 8, 3, 1), (4096, 8, 2, 2), (1024, 4, 2, 4), (8192, 16, 2, 1),
]  # fmt: skip
CPU_VARIANTS = [(512, None, 3, 1), (256, 4, 2, 2)]
SMALL = ((2, 256, 16, 16, 16), "channels_last")  # the launch-bound level of the host measurement
ACT = "leaky_relu"


def _label(v: tuple) -> str:
    tile, warps, stages, waves = v
    return f"tile{tile}_w{warps or 'auto'}_s{stages}_x{waves}"


@contextlib.contextmanager
def patched(variant: tuple, cuda: bool) -> Iterator[None]:
    """Planner constants of ``variant`` for the duration of the block."""
    from medgn.ops import group_norm_plan as gp
    from medgn.ops import group_norm_triton as gt

    tile, warps, stages, waves = variant
    saved = (gp._TILE_GPU, gp._TILE_CPU, gp._warps, gt._STAGES, gp._device_limits)
    limits = gp._device_limits

    def device_limits(x: torch.Tensor) -> tuple[int, int]:
        sms, l2 = limits(x)
        return sms * waves, l2

    if cuda:
        gp._TILE_GPU = tile
    else:
        gp._TILE_CPU = tile
    if warps is not None:
        gp._warps = lambda block: warps
    gt._STAGES = stages
    gp._device_limits = device_limits
    try:
        yield
    finally:
        gp._TILE_GPU, gp._TILE_CPU, gp._warps, gt._STAGES, gp._device_limits = saved


@contextlib.contextmanager
def skipped(module: Any, name: str) -> Iterator[None]:
    """Kernel ``name`` of ``module`` launches nothing for the duration of the block."""

    class _Skip:
        def __getitem__(self, grid: Any) -> Any:
            return lambda *args, **kwargs: None

    saved = getattr(module, name)
    setattr(module, name, _Skip())
    try:
        yield
    finally:
        setattr(module, name, saved)


def _inputs(shape: tuple[int, ...], layout: str, device: torch.device, seed: int = 0) -> dict[str, Any]:
    from medgn.layers.group_rule import num_groups_for

    gen = torch.Generator(device=device).manual_seed(seed)
    fmt = torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format

    def rand(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=gen, device=device).to(torch.bfloat16)

    c = shape[1]
    return {"x": rand(*shape).contiguous(memory_format=fmt), "w": rand(c), "b": rand(c),
            "dy": rand(*shape).contiguous(memory_format=fmt), "groups": num_groups_for(c)}  # fmt: skip


def _forward(t: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from medgn.ops.group_norm_triton import group_norm_forward

    return group_norm_forward(t["x"], t["groups"], t["w"], t["b"], 1e-5, ACT, None, 0.01, path="split")


def _backward(t: dict[str, Any], mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    from medgn.ops.group_norm_triton import group_norm_backward

    return group_norm_backward(t["dy"], t["x"], t["w"], t["b"], None, mean, rstd, t["groups"], ACT, 0.01,
                               False, path="split")[0]  # fmt: skip


def _run_variant(t: dict[str, Any], variant: tuple, cuda: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One full forward and backward of a variant (compiles its kernels): (y, dx)."""
    with patched(variant, cuda):
        y, mean, rstd = _forward(t)
        return y, _backward(t, mean, rstd)


def precompile_worker(index: int, jobs: int, device: torch.device) -> None:
    """Compile this worker's share of (shape, variant) pairs into Triton's cache."""
    from medgn.ops import group_norm_kernels as k
    from medgn.ops import group_norm_kernels_bwd as kb

    cuda = device.type == "cuda"
    pairs = [(s, v) for s in shapes(device) for v in variants(device)]
    for i, ((shape, layout), v) in enumerate(pairs):
        if i % jobs != index:
            continue
        t = _inputs(shape, layout, device)
        _run_variant(t, v, cuda)
        with patched(v, cuda), skipped(k, "_apply_kernel"), skipped(kb, "_bwd_dx_kernel"):
            _, mean, rstd = _forward(t)
            _backward(t, mean, rstd)
    if cuda:
        torch.cuda.synchronize(device)


def shapes(device: torch.device) -> list[tuple]:
    return GPU_SHAPES if device.type == "cuda" else CPU_SHAPES


def variants(device: torch.device) -> list[tuple]:
    return VARIANTS if device.type == "cuda" else CPU_VARIANTS


def precompile(device: torch.device, jobs: int) -> float:
    """Run ``jobs`` worker processes that fill Triton's cache; return their wall seconds."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--device", device.type, "--worker", f"{i}/{jobs}"])
             for i in range(jobs)]  # fmt: skip
    codes = [p.wait() for p in procs]
    if any(codes):
        print(f"precompile: worker exit codes {codes} (the sweep compiles what they did not)", flush=True)
    return time.perf_counter() - t0


def _time_kernels(t: dict[str, Any], timer: Any) -> dict[str, float]:
    """Median ms of the split forward and backward, and of each with its second kernel skipped."""
    from medgn.ops import group_norm_kernels as k
    from medgn.ops import group_norm_kernels_bwd as kb

    ms = {"fwd": timer.median_ms(lambda: _forward(t))}
    with skipped(k, "_apply_kernel"):
        ms["stats"] = timer.median_ms(lambda: _forward(t))
    _, mean, rstd = _forward(t)
    ms["bwd"] = timer.median_ms(lambda: _backward(t, mean, rstd))
    with skipped(kb, "_bwd_dx_kernel"):
        ms["reduce"] = timer.median_ms(lambda: _backward(t, mean, rstd))
    return ms


def sweep(device: torch.device, timer: Any, copy: float) -> list[dict[str, Any]]:
    """Rows of every shape and variant."""
    from bench_group_norm import CHECK_TOL, _check

    from medgn.ops.group_norm_plan import _plan

    cuda = device.type == "cuda"
    rows = []
    for shape, layout in shapes(device):
        t = _inputs(shape, layout, device)
        volume = t["x"].numel() * t["x"].element_size()
        for v in variants(device):
            y, dx = _run_variant(t, v, cuda)
            err = _check(y, dx, [t["x"], t["w"], t["b"], None], t["dy"], t["groups"], ACT)
            with patched(v, cuda):
                p = _plan(t["x"], t["groups"], 1, chunked=False)
                ms = _time_kernels(t, timer)
            ms["apply"] = ms["fwd"] - ms["stats"]
            ms["dx"] = ms["bwd"] - ms["reduce"]
            vols = {"fwd": 3, "stats": 1, "apply": 2, "bwd": 5, "reduce": 2, "dx": 3}
            row = {
                "shape": "x".join(map(str, shape)), "layout": layout, "groups": t["groups"],
                "variant": _label(v), "tile": v[0], "warps": p.warps, "stages": v[2], "waves": v[3],
                "splits": p.SPLITS, "programs": p.rows * p.SPLITS, "gpb": p.GPB,
                "check_rel_err": err, "check_ok": err <= CHECK_TOL[torch.bfloat16],
            }  # fmt: skip
            for key, value in ms.items():
                row[f"{key}_ms"] = round(value, 5)
                row[f"{key}_gb_s"] = round(vols[key] * volume / max(value, 1e-9) * 1e-6, 1)
            row["fwd_pct_copy_min_bytes"] = round(100 * 2 * volume / (ms["fwd"] * 1e-3) / 1e9 / copy, 1)
            rows.append(row)
            print(f"{row['shape']:>17} {layout:13} {row['variant']:22} splits={p.SPLITS:<4} "
                  f"fwd {ms['fwd']:.4f} (stats {ms['stats']:.4f} apply {ms['apply']:.4f})  "
                  f"bwd {ms['bwd']:.4f} (reduce {ms['reduce']:.4f} dx {ms['dx']:.4f})  "
                  f"{'ok' if row['check_ok'] else 'CHECK FAIL'}", flush=True)  # fmt: skip
    return rows


def host_overhead(device: torch.device, timer: Any, out: Path, calls: int) -> dict[str, Any]:
    """Host us per autograd call (fwd + bwd via the custom ops) vs the GPU's us, and a cProfile."""
    from medgn.ops import group_norm

    shape, layout = SMALL if device.type == "cuda" else CPU_SHAPES[1]
    t = _inputs(shape, layout, device)
    x = t["x"].detach().requires_grad_()

    def step() -> None:
        y = group_norm(x, t["groups"], t["w"], t["b"], activation=ACT, backend="triton")
        torch.autograd.grad(y, x, t["dy"])

    def op_forward() -> None:
        with torch.no_grad():
            group_norm(x, t["groups"], t["w"], t["b"], activation=ACT, backend="triton")

    def direct_forward() -> None:
        from medgn.ops.group_norm_triton import group_norm_forward

        group_norm_forward(t["x"], t["groups"], t["w"], t["b"], 1e-5, ACT, None, 0.01)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def host_us(fn: Any) -> float:
        """Host microseconds per call of fn, calls queued without synchronising."""
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host = (time.perf_counter() - t0) / calls * 1e6
        sync()
        return round(host, 1)

    gpu_ms = timer.median_ms(step)
    result = {"shape": "x".join(map(str, shape)), "layout": layout, "calls": calls,
              "gpu_us_per_call": round(gpu_ms * 1e3, 1), "host_us_per_call": host_us(step),
              "host_us_forward_op_no_grad": host_us(op_forward),
              "host_us_forward_launcher": host_us(direct_forward)}  # fmt: skip
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(calls):
        step()
    profile.disable()
    sync()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(30)
    (out / "host_profile.txt").write_text(text.getvalue(), encoding="utf-8")
    print(f"host: {result}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--jobs", type=int, help="parallel compile workers (0: none; default 12 on cuda, 0 on cpu)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("tune_group_norm: no CUDA device, nothing measured (use --device cpu for a smoke run)")
        return 0
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    device = torch.device(args.device)
    if args.worker:
        index, jobs = map(int, args.worker.split("/"))
        precompile_worker(index, jobs, device)
        return 0
    from bench_group_norm import Timer, _device_tag, copy_gb_s

    from medgn.environment import versions
    from medgn.files import atomic_write_json

    cuda = device.type == "cuda"
    jobs = args.jobs if args.jobs is not None else (12 if cuda else 0)
    compile_s = precompile(device, jobs) if jobs > 0 else 0.0
    timer = Timer(device, 3 if cuda else 1, 15 if cuda else 1)
    copy = copy_gb_s(timer)
    name, tag = _device_tag(device)
    print(f"{name}: copy {copy:.0f} GB/s; precompile {compile_s:.1f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    host = host_overhead(device, timer, args.out, 200 if cuda else 2)
    rows = sweep(device, timer, copy)
    out = args.out / f"group_norm_tune_{tag}.json"
    atomic_write_json(out, {"device": name, "versions": versions(), "copy_gb_s": round(copy, 1),
                            "activation": ACT, "dtype": "bfloat16", "timing": "cuda events, queued, "
                            "L2 flush between samples, median of 15 after 3 warm-ups" if cuda else
                            "wall clock (interpreter smoke run, not a speed figure)",
                            "host": host, "rows": rows})  # fmt: skip
    print(f"wrote {out}")
    best = {}
    for r in rows:
        key = (r["shape"], r["layout"])
        for p in ("fwd", "bwd"):
            if r["check_ok"] and (best.get((*key, p)) is None or r[f"{p}_ms"] < best[(*key, p)][f"{p}_ms"]):
                best[(*key, p)] = r
    for (shape, layout, p), r in best.items():
        base = next(b for b in rows if (b["shape"], b["layout"]) == (shape, layout))
        print(f"best {p:3} {shape:>17} {layout:13} {r['variant']:22} {r[f'{p}_ms']:.4f} ms "
              f"(default {base[f'{p}_ms']:.4f})")  # fmt: skip
    return 0 if all(r["check_ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
