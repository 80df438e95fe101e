"""Tuning sweep of the split-path GroupNorm kernels: tile size, warps, pipelining depth, grid size.

Each variant patches the launch planner's constants (``medgn.ops.group_norm_plan``): elements per
tile and warps per program (``_TILES_16BIT``, ``_TILES_FP32``; warps None: the ``_warps`` rule),
software-pipelining stages (``_STAGES``) and how many programs the grid may hold (``waves`` x the
one-wave count of ``_device_limits``); the variant "default" is the planner as it is. For each
shape it times, with the CUDA-event timer of ``bench_group_norm`` (queued calls, L2 flushed
between samples, median):

- ``fwd``: ``group_norm_forward`` on the split path (statistics kernel + apply kernel);
- ``stats``: the same call with the apply kernel skipped, so ``fwd - stats`` is the apply kernel;
- ``bwd``: ``group_norm_backward`` on the split path (reduce kernel + dx kernel);
- ``reduce``: the same with the dx kernel skipped.

and checks the full forward's y and backward's dx of every variant against float64 (relative L2
error, ``bench_group_norm.CHECK_TOL``). GB/s count the bytes each kernel must move (stats: x;
apply: x + y; reduce: x + dy; dx: x + dy + dx). Kernels are compiled first in parallel worker
processes (Triton's disk cache), so the sweep's wall time is not one compile after another.

It also measures the host side of one call at a small, launch-bound level: forward + backward
through the eager path and through the custom ops, the forward alone, against the GPU's time
replayed from a CUDA graph, and a cProfile of the eager calls (``host_profile.txt``).

Results: ``<out>/group_norm_tune_<device>.json``, rewritten after every row so a run stopped by a
time limit keeps what it measured. ``--device cpu`` is a smoke run (Triton's
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
# (shape, layout, dtype) with the model's group rule: the 128^3 level (both layouts, bf16 and
# float32) and the 64^3 level of the U-Net at batch 2.
BF16, FP32 = torch.bfloat16, torch.float32
GPU_SHAPES = [((2, 32, 128, 128, 128), "contiguous", BF16), ((2, 32, 128, 128, 128), "channels_last", BF16),
              ((2, 64, 64, 64, 64), "channels_last", BF16), ((2, 32, 128, 128, 128), "contiguous", FP32),
              ((2, 32, 128, 128, 128), "channels_last", FP32)]  # fmt: skip
CPU_SHAPES = [((2, 8, 6, 6, 6), "contiguous", BF16), ((2, 8, 6, 6, 6), "channels_last", FP32)]
# (tile elements, warps or None for the planner's rule, stages, waves); None: the planner as it is.
VARIANTS = [
    None, (2048, None, 3, 1),
    (1024, None, 3, 1), (4096, None, 3, 1), (8192, None, 3, 1),
    (2048, 4, 3, 1), (2048, 16, 3, 1),
    (2048, None, 1, 1), (2048, None, 2, 1), (2048, None, 4, 1),
    (2048, None, 3, 2), (2048, None, 3, 4),
    (4096, 8, 3, 1), (4096, 8, 2, 2), (1024, 4, 2, 4), (8192, 16, 2, 1),
]  # fmt: skip
# --quick (the GPU check): the planner's tiles against medgn 0.1's and three alternatives, and the
# two new tile sizes with 4 pipelining stages (4 beat 3 at 0.1's tiles; not yet tried with these).
QUICK_VARIANTS = [None, (2048, None, 3, 1), (1024, None, 3, 1), (8192, None, 3, 1), (2048, 4, 3, 1),
                  (1024, None, 4, 1), (8192, None, 4, 1)]  # fmt: skip
CPU_VARIANTS = [None, (256, 4, 2, 2)]
SMALL = ((2, 256, 16, 16, 16), "channels_last")  # the launch-bound level of the host measurement
ACT = "leaky_relu"


def _label(v: tuple | None) -> str:
    if v is None:
        return "default"
    tile, warps, stages, waves = v
    return f"tile{tile}_w{warps or 'auto'}_s{stages}_x{waves}"


@contextlib.contextmanager
def patched(variant: tuple | None, cuda: bool) -> Iterator[None]:
    """Planner constants of ``variant`` for the duration of the block (None: as they are)."""
    from medgn.ops import group_norm_plan as gp
    from medgn.ops import group_norm_triton as gt

    if variant is None:
        yield
        return
    tile, warps, stages, waves = variant
    saved = (gp._TILE_CPU, gp._TILES_16BIT, gp._TILES_FP32, gt._STAGES, gp._device_limits)
    limits = gp._device_limits

    def device_limits(x: torch.Tensor) -> tuple[int, int]:
        sms, l2 = limits(x)
        return sms * waves, l2

    if not cuda:
        gp._TILE_CPU = tile
    gp._TILES_16BIT = gp._TILES_FP32 = dict.fromkeys(gp._TILES_16BIT, (tile, warps))
    gt._STAGES = stages
    gp._device_limits = device_limits
    gp._PLANS.clear()
    try:
        yield
    finally:
        gp._TILE_CPU, gp._TILES_16BIT, gp._TILES_FP32, gt._STAGES, gp._device_limits = saved
        gp._PLANS.clear()


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


def _inputs(
    shape: tuple[int, ...], layout: str, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> dict[str, Any]:
    from medgn.layers.group_rule import num_groups_for

    gen = torch.Generator(device=device).manual_seed(seed)
    fmt = torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format

    def rand(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=gen, device=device).to(dtype)

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


def precompile_worker(index: int, jobs: int, device: torch.device, quick: bool) -> None:
    """Compile this worker's share of (shape, variant) pairs into Triton's cache."""
    from medgn.ops import group_norm_kernels as k
    from medgn.ops import group_norm_kernels_bwd as kb

    cuda = device.type == "cuda"
    pairs = [(s, v) for s in shapes(device) for v in variants(device, quick)]
    for i, ((shape, layout, dtype), v) in enumerate(pairs):
        if i % jobs != index:
            continue
        t = _inputs(shape, layout, dtype, device)
        _run_variant(t, v, cuda)
        with patched(v, cuda), skipped(k, "_apply_kernel"), skipped(kb, "_bwd_dx_kernel"):
            _, mean, rstd = _forward(t)
            _backward(t, mean, rstd)
    if cuda:
        torch.cuda.synchronize(device)


def shapes(device: torch.device) -> list[tuple]:
    return GPU_SHAPES if device.type == "cuda" else CPU_SHAPES


def variants(device: torch.device, quick: bool) -> list[tuple | None]:
    if device.type != "cuda":
        return CPU_VARIANTS
    return QUICK_VARIANTS if quick else VARIANTS


def precompile(device: torch.device, jobs: int, quick: bool) -> float:
    """Run ``jobs`` worker processes that fill Triton's cache; return their wall seconds."""
    t0 = time.perf_counter()
    extra = ["--quick"] if quick else []
    procs = [subprocess.Popen([sys.executable, __file__, "--device", device.type, "--worker", f"{i}/{jobs}", *extra])
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


def sweep(device: torch.device, timer: Any, copy: float, quick: bool, write: Any) -> list[dict[str, Any]]:
    """Rows of every shape and variant; ``write(rows)`` after each."""
    from bench_group_norm import CHECK_TOL, _check

    from medgn.ops import group_norm_triton as gt
    from medgn.ops.group_norm_plan import _plan

    cuda = device.type == "cuda"
    rows = []
    for shape, layout, dtype in shapes(device):
        t = _inputs(shape, layout, dtype, device)
        volume = t["x"].numel() * t["x"].element_size()
        for v in variants(device, quick):
            y, dx = _run_variant(t, v, cuda)
            err = _check(y, dx, [t["x"], t["w"], t["b"], None], t["dy"], t["groups"], ACT)
            with patched(v, cuda):
                p = _plan(t["x"], t["groups"], 1, chunked=False)
                pb = _plan(t["x"], t["groups"], 2, chunked=False)
                stages = gt._STAGES
                ms = _time_kernels(t, timer)
            ms["apply"] = ms["fwd"] - ms["stats"]
            ms["dx"] = ms["bwd"] - ms["reduce"]
            vols = {"fwd": 3, "stats": 1, "apply": 2, "bwd": 5, "reduce": 2, "dx": 3}
            row = {
                "shape": "x".join(map(str, shape)), "layout": layout, "dtype": str(dtype).split(".")[-1],
                "groups": t["groups"], "variant": _label(v), "stages": stages, "waves": v[3] if v else 1,
                "fwd_tile": p.GPB * p.BLOCK_C * p.BLOCK_S, "fwd_warps": p.warps, "fwd_splits": p.SPLITS,
                "bwd_tile": pb.GPB * pb.BLOCK_C * pb.BLOCK_S, "bwd_warps": pb.warps, "bwd_splits": pb.SPLITS,
                "gpb": p.GPB, "check_rel_err": err, "check_ok": err <= CHECK_TOL[dtype],
            }  # fmt: skip
            for key, value in ms.items():
                row[f"{key}_ms"] = round(value, 5)
                row[f"{key}_gb_s"] = round(vols[key] * volume / max(value, 1e-9) * 1e-6, 1)
            row["fwd_pct_copy_min_bytes"] = round(100 * 2 * volume / (ms["fwd"] * 1e-3) / 1e9 / copy, 1)
            rows.append(row)
            write(rows)
            print(f"{row['shape']:>17} {layout:13} {row['dtype']:8} {row['variant']:22} splits={p.SPLITS:<4} "
                  f"fwd {ms['fwd']:.4f} (stats {ms['stats']:.4f} apply {ms['apply']:.4f})  "
                  f"bwd {ms['bwd']:.4f} (reduce {ms['reduce']:.4f} dx {ms['dx']:.4f})  "
                  f"{'ok' if row['check_ok'] else 'CHECK FAIL'}", flush=True)  # fmt: skip
    return rows


def host_overhead(device: torch.device, timer: Any, out: Path, calls: int) -> dict[str, Any]:
    """Host us per call: autograd forward + backward through the eager path and through the custom
    ops, forward without gradients, the forward launcher alone; the GPU's us per forward +
    backward replayed from a CUDA graph (no host work) and queued from Python; a cProfile."""
    from medgn.ops import group_norm

    gn_module = sys.modules["medgn.ops.group_norm"]
    shape, layout = SMALL if device.type == "cuda" else CPU_SHAPES[1][:2]
    t = _inputs(shape, layout, BF16, device)
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
              "gpu_us_per_call_queued": round(gpu_ms * 1e3, 1), "host_us_per_call": host_us(step),
              "host_us_forward_no_grad": host_us(op_forward),
              "host_us_forward_launcher": host_us(direct_forward)}  # fmt: skip
    eager_call = gn_module._eager_call
    gn_module._eager_call = lambda *tensors: False
    try:
        result["custom_ops_host_us_per_call"] = host_us(step)
        result["custom_ops_host_us_forward_no_grad"] = host_us(op_forward)
    finally:
        gn_module._eager_call = eager_call
    if device.type == "cuda":
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            result["gpu_us_per_call_graph"] = round(timer.median_ms(graph.replay) * 1e3, 1)
        except RuntimeError as exc:  # a capture failure is a finding, not the end of the sweep
            result["gpu_us_per_call_graph"] = f"capture failed: {exc}"
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
    parser.add_argument("--quick", action="store_true", help=f"{len(QUICK_VARIANTS)} variants (the GPU check)")
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
        precompile_worker(index, jobs, device, args.quick)
        return 0
    from bench_group_norm import Timer, _device_tag, copy_gb_s, warm_clocks

    from medgn.environment import versions
    from medgn.files import atomic_write_json

    cuda = device.type == "cuda"
    jobs = args.jobs if args.jobs is not None else (12 if cuda else 0)
    compile_s = precompile(device, jobs, args.quick) if jobs > 0 else 0.0
    timer = Timer(device, 3 if cuda else 1, 15 if cuda else 1)
    warm_clocks(device)
    copy = copy_gb_s(timer)
    name, tag = _device_tag(device)
    print(f"{name}: copy {copy:.0f} GB/s; precompile {compile_s:.1f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    host = host_overhead(device, timer, args.out, 200 if cuda else 2)
    out = args.out / f"group_norm_tune_{tag}.json"

    def write(rows: list[dict[str, Any]]) -> None:
        atomic_write_json(out, {"device": name, "versions": versions(), "copy_gb_s": round(copy, 1),
                                "activation": ACT, "timing": "cuda events, queued, L2 flush between "
                                "samples, median of 15 after 3 warm-ups" if cuda else
                                "wall clock (interpreter smoke run, not a speed figure)",
                                "host": host, "rows": rows})  # fmt: skip

    rows = sweep(device, timer, copy, args.quick, write)
    print(f"wrote {out}")
    best: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        for p in ("fwd", "bwd"):
            key = (r["shape"], r["layout"], r["dtype"], p)
            if r["check_ok"] and (key not in best or r[f"{p}_ms"] < best[key][f"{p}_ms"]):
                best[key] = r
    for (shape, layout, dtype, p), r in best.items():
        base = next(b for b in rows if (b["shape"], b["layout"], b["dtype"]) == (shape, layout, dtype))
        print(f"best {p:3} {shape:>17} {layout:13} {dtype:8} {r['variant']:22} {r[f'{p}_ms']:.4f} ms "
              f"({base['variant']} {base[f'{p}_ms']:.4f})")  # fmt: skip
    return 0 if all(r["check_ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
