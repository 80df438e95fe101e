"""CPU speed of an exported model: onnxruntime against PyTorch eager in float32 and bfloat16.

Version 0.1's LA2018 CPU network (4-stage UNet3D, 16..128 channels, GroupNorm, untrained: speed
only) is exported with ``medgn.export`` and run on one 64x48x32 window (that recipe's patch, batch 1)
by onnxruntime (fp32), PyTorch eager fp32 and PyTorch eager under CPU bf16 autocast, each with 2
intra-op threads. Every variant is warmed up, then timed ``--repeats`` times; the median and the
interquartile range in milliseconds are reported with the largest difference from PyTorch fp32
(the bf16 difference is bf16 rounding, reported, not asserted). Results: a table on stdout and
``benchmarks/results/export_cpu.json`` with the machine (CPU model, cores the process may use).

Usage: ``python benchmarks/bench_export.py [--repeats N]``; ``taskset -c 0`` pins it to one core
(2 threads then share that core, which the JSON records).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medgn.configtools import build  # noqa: E402
from medgn.export import export_module, run_exported  # noqa: E402
from medgn.models.config import UNet3DConfig  # noqa: E402
from medgn.models.registry import build_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# Two threads: the CPU budget of the machines medgn's CPU figures are compared on.
THREADS = 2
# Version 0.1's configs/la2018_cpu.yaml: its network and its patch (a window sliding inference runs many
# times); the figures in the README and export_cpu.json were measured on it.
FEATURES = [16, 32, 64, 128]
WINDOW = (64, 48, 32)
STRIDES = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _time(fn: Any, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _stats(ms: list[float]) -> dict[str, float]:
    q = statistics.quantiles(ms, n=4) if len(ms) >= 4 else [min(ms), statistics.median(ms), max(ms)]
    return {
        "median_ms": round(statistics.median(ms), 2),
        "q1_ms": round(q[0], 2),
        "q3_ms": round(q[2], 2),
        "runs": len(ms),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    cfg = build(
        UNet3DConfig,
        {"features": FEATURES, "norm": "group", "activation": "leaky_relu", "deep_supervision": True},
        "model",
    )
    model = build_model(cfg, 1, 2, STRIDES, [[3, 3, 3]] * 4).eval()
    x = torch.randn(1, 1, *WINDOW, generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_module(model, 1, Path(tmp) / "model.onnx", fmt="onnx", example_size=WINDOW)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        feed = {"image": x.numpy()}
        with torch.no_grad():
            ref = model(x)
            ref = (ref[0] if isinstance(ref, (list, tuple)) else ref).numpy()

            def fp32() -> Any:
                return model(x)

            def bf16() -> Any:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return model(x)

            results = {
                "onnxruntime_fp32": (_time(lambda: session.run(None, feed), args.repeats), session.run(None, feed)[0]),
                "pytorch_fp32": (_time(fp32, args.repeats), ref),
                "pytorch_bf16_autocast": (_time(bf16, args.repeats), None),
            }
            out_bf16 = bf16()
            out_bf16 = (out_bf16[0] if isinstance(out_bf16, (list, tuple)) else out_bf16).float().numpy()
        assert np.allclose(run_exported(onnx_path, "onnx", x.numpy(), threads=THREADS), ref, atol=1e-3)
    rows = {}
    for name, (ms, out) in results.items():
        diff = float(np.max(np.abs((out if out is not None else out_bf16) - ref)))
        rows[name] = {**_stats(ms), "max_abs_diff_vs_pytorch_fp32": diff}
    base = rows["pytorch_fp32"]["median_ms"]
    for row in rows.values():
        row["speedup_vs_pytorch_fp32"] = round(base / row["median_ms"], 2)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    record = {
        "benchmark": "export_cpu", "window": list(WINDOW), "features": FEATURES, "threads": THREADS,
        "cpu": _cpu_name(), "usable_cores": cores,
        "note": f"{THREADS} intra-op threads on {len(cores) if cores else '?'} usable core(s)",
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "python": platform.python_version()},
        "results": rows,
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "export_cpu.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"{'variant':26s} {'median ms':>10s} {'IQR ms':>16s} {'speedup':>8s} {'max |diff|':>11s}")
    for name, row in rows.items():
        print(
            f"{name:26s} {row['median_ms']:10.1f} {row['q1_ms']:7.1f}-{row['q3_ms']:<8.1f} "
            f"{row['speedup_vs_pytorch_fp32']:8.2f} {row['max_abs_diff_vs_pytorch_fp32']:11.2e}"
        )
    print(f"cpu: {record['cpu']}; usable cores {cores}; results -> {RESULTS / 'export_cpu.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
