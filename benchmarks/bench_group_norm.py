"""GroupNorm speed on a CUDA GPU: medgn's Triton kernels against PyTorch eager, autocast and compile.

Providers: ``medgn`` (fused Triton GN + activation), ``eager`` (``F.group_norm`` then a separate
activation, at the input dtype), ``eager_autocast`` (the same under bf16 autocast with fp32
parameters: PyTorch runs GroupNorm in fp32, so a bf16 network pays the casts; bf16 rows only) and
``compile`` (``torch.compile`` of GN + activation). For 3D U-Net levels at batch 2, fp32 and bf16,
and forward, backward and forward+backward, it reports the median time over CUDA-event-timed
repetitions after warm-up, the achieved bandwidth (forward counts 2 tensor volumes: read x, write
y; backward 3: read x and dy, write dx; both 5), that bandwidth as a percentage of a device-to-device
copy measured in the same run, and medgn's speed-up over each provider. Results go to
``benchmarks/results/group_norm_<device>.{csv,json}`` with the device name and library versions.

Without CUDA it prints that and exits 0 without measuring. ``--check`` instead runs a small
correctness smoke of the Triton path against the float64 reference (through Triton's interpreter
on CPU when there is no GPU) and exits 1 on a mismatch.

Usage: ``python benchmarks/bench_group_norm.py [--quick] [--check] [--activation silu]``.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# U-Net levels at batch 2 from the 128^3 patch down to the bottleneck (channels 32..320).
SHAPES = [(2, 32, 128, 128, 128), (2, 64, 64, 64, 64), (2, 128, 32, 32, 32), (2, 256, 16, 16, 16),
          (2, 320, 8, 8, 8)]  # fmt: skip
QUICK_SHAPES = [SHAPES[0], SHAPES[-1]]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Volumes moved per mode: the minimum traffic the roofline counts (see the module docstring).
VOLUMES = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}
GROUPS = 32  # the paper's default G; every level above has C divisible by 32
WARMUP = 5  # compile/autotune and clock ramp-up happen in the first calls
REPS = 30  # enough repetitions for a stable median of sub-millisecond kernels
COPY_BYTES = 1 << 30  # 1 GiB: far past L2, so the copy measures HBM bandwidth


def _median_ms(fn: Callable[[], Any]) -> float:
    """Median milliseconds of ``fn`` over REPS CUDA-event-timed calls after WARMUP calls."""
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth in GB/s (read + write counted)."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    return 2 * COPY_BYTES / (ms * 1e-3) / 1e9


def _providers(activation: str, dtype: torch.dtype) -> dict[str, Callable[..., torch.Tensor]]:
    """Forward functions f(x, weight, bias) -> y for each provider available at this dtype."""
    import torch.nn.functional as F

    from medgn.ops import group_norm
    from medgn.ops.group_norm_ref import apply_activation

    def eager(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return apply_activation(F.group_norm(x, GROUPS, w, b, 1e-5), activation, 0.01)

    def autocast(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return eager(x, w.float(), b.float())

    def medgn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return group_norm(x, GROUPS, w, b, activation=activation, backend="triton")

    out = {"medgn": medgn, "eager": eager, "compile": torch.compile(eager, dynamic=False)}
    if dtype == torch.bfloat16:
        out["eager_autocast"] = autocast
    return out


def _time_modes(
    fn: Callable[..., torch.Tensor],
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    dy: torch.Tensor,
) -> dict[str, float]:
    """Median ms of forward, backward (of one retained graph) and forward+backward of ``fn``."""
    inputs = (x, w, b)
    y = fn(*inputs)
    # autograd.grad returns fresh gradients: no accumulation into .grad inflates the timings.
    return {
        "fwd": _median_ms(lambda: fn(*inputs)),
        "bwd": _median_ms(lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)),
        "fwd+bwd": _median_ms(lambda: torch.autograd.grad(fn(*inputs), inputs, dy)),
    }


def measure(shapes: list[tuple[int, ...]], activation: str) -> list[dict[str, Any]]:
    """Time every provider, dtype, shape and mode; return one row per measurement."""
    # One compiled graph per (shape, dtype) plus its backward: raise dynamo's recompile limit (8)
    # so late shapes are not silently run eagerly.
    torch._dynamo.config.cache_size_limit = 64
    copy_gbs = copy_bandwidth_gbs()
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s", flush=True)
    rows = []
    for dname, dtype in DTYPES.items():
        for shape in shapes:
            x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
            w = torch.randn(shape[1], device="cuda", dtype=dtype, requires_grad=True)
            b = torch.randn(shape[1], device="cuda", dtype=dtype, requires_grad=True)
            dy = torch.randn_like(x)
            volume = x.numel() * x.element_size()
            for name, fn in _providers(activation, dtype).items():
                for mode, ms in _time_modes(fn, x, w, b, dy).items():
                    gbs = VOLUMES[mode] * volume / (ms * 1e-3) / 1e9
                    rows.append({"provider": name, "dtype": dname, "shape": "x".join(map(str, shape)),
                                 "mode": mode, "median_ms": round(ms, 4), "gb_s": round(gbs, 1),
                                 "pct_copy": round(100 * gbs / copy_gbs, 1),
                                 "copy_gb_s": round(copy_gbs, 1)})  # fmt: skip
                    print(f"{dname} {rows[-1]['shape']:>18} {mode:8} {name:15} {ms:9.3f} ms "
                          f"{gbs:7.0f} GB/s {rows[-1]['pct_copy']:5.1f} %", flush=True)  # fmt: skip
    _add_speedups(rows)
    return rows


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    """Add ``speedup_vs_<provider>`` (other time / medgn time) to each medgn row."""
    index = {(r["provider"], r["dtype"], r["shape"], r["mode"]): r["median_ms"] for r in rows}
    for r in rows:
        if r["provider"] != "medgn":
            continue
        for other in ("eager", "eager_autocast", "compile"):
            ms = index.get((other, r["dtype"], r["shape"], r["mode"]))
            if ms is not None:
                r[f"speedup_vs_{other}"] = round(ms / r["median_ms"], 2)


def write_results(rows: list[dict[str, Any]], activation: str) -> Path:
    """Write rows to CSV and JSON (atomic) with the device and versions; return the JSON path."""
    from medgn.environment import versions
    from medgn.files import atomic_write_json, atomic_write_text

    device = torch.cuda.get_device_name()
    stem = "group_norm_" + re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_").lower()
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k.startswith("speedup"), k))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(RESULTS / f"{stem}.csv", buf.getvalue())
    meta = {"device": device, "versions": versions(), "activation": activation, "groups": GROUPS,
            "warmup": WARMUP, "reps": REPS, "statistic": "median", "rows": rows}  # fmt: skip
    return atomic_write_json(RESULTS / f"{stem}.json", meta)


def check() -> int:
    """Compare the Triton path (fwd and grads) with the float64 reference on small shapes."""
    from medgn.ops import ACTIVATIONS, group_norm, group_norm_ref

    device = "cuda" if torch.cuda.is_available() else "cpu"
    failures = 0
    for shape, g in (((1, 16, 5, 7, 9), 4), ((2, 8, 6, 10), 8)):
        for act in ACTIVATIONS:
            torch.manual_seed(0)
            x = torch.randn(shape, device=device, requires_grad=True)
            w = torch.randn(shape[1], device=device, requires_grad=True)
            r = torch.randn(shape, device=device, requires_grad=True)
            dy = torch.randn(shape, device=device)
            y = group_norm(x, g, w, None, activation=act, residual=r, backend="triton")
            grads = torch.autograd.grad(y, (x, w, r), dy)
            leaves = [t.detach().double().requires_grad_() for t in (x, w, r)]
            y64 = group_norm_ref(leaves[0], g, leaves[1], None, 1e-5, act, leaves[2])
            ref = torch.autograd.grad(y64, leaves, dy.double())
            # fp32 kernels vs float64: 1e-4 leaves room for sums over ~300 elements per group.
            err = max((a.double() - b).abs().max().item() for a, b in zip((y, *grads), (y64, *ref)))
            ok = err < 1e-4
            failures += not ok
            print(f"check {shape} G={g} {act:10} max error {err:.2e} {'ok' if ok else 'FAIL'}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, then run the check or the GPU measurement."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="largest and smallest shape only")
    parser.add_argument("--check", action="store_true", help="correctness smoke, no timing")
    parser.add_argument("--activation", default="silu", help="fused activation (default silu)")
    args = parser.parse_args(argv)
    if args.check:
        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
        return check()
    if not torch.cuda.is_available():
        print("bench_group_norm: no CUDA device, nothing measured (run it on a GPU machine)")
        return 0
    rows = measure(QUICK_SHAPES if args.quick else SHAPES, args.activation)
    print(f"wrote {write_results(rows, args.activation)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
