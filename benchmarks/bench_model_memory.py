"""Training memory of UNet3D: the meta-device estimate against measured memory growth.

For a few norms, checkpointing choices and patch sizes, each configuration runs in a fresh
subprocess: build the network, one warm-up training step (SGD with momentum, so the optimizer state
exists), then one measured step (forward with deep supervision, cross-entropy, backward, update).
Measured on the CPU: growth of the resident set during that step (peak RSS, reset through
``/proc/self/clear_refs``, minus RSS before it). On a CUDA device: ``torch.cuda.max_memory_allocated``
during the step minus the memory allocated before it. The comparable estimate is what a step adds
on top of weights and optimizer state: kept activations + gradients + backward transients from
:func:`medgn.models.summary.summary`. medgn's GroupNorm runs its pure-torch reference on the CPU,
which keeps more intermediates than the fused GPU kernel the estimate models, so CPU rows for
``group`` are expected above the estimate. Results go to ``benchmarks/results/model_memory_<device>.{json,csv}``.

Usage: ``python benchmarks/bench_model_memory.py [--quick] [--device cpu|cuda]``
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from medgn.environment import versions
from medgn.files import atomic_write_json, atomic_write_text
from medgn.models import UNet3D
from medgn.models.summary import summary

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20

# CPU: a 4-stage network small enough for a 2-core machine; activations still dominate at 32^3+.
CPU_FEATURES = (16, 32, 64, 128)
CPU_CASES = [
    # (norm, checkpoint, patch edge)
    ("group_torch", False, 32),
    ("group_torch", False, 48),
    ("group_torch", False, 64),
    ("group_torch", True, 48),
    ("batch", False, 48),
    ("group", False, 32),
    ("group", False, 48),
]
# GPU: nnU-Net's default widths at the patch sizes the planner considers, bf16 autocast.
GPU_FEATURES = (32, 64, 128, 256, 320, 320)
GPU_CASES = [
    (norm, ckpt, edge) for norm in ("group", "group_torch") for ckpt in (False, True) for edge in (64, 96, 128)
]


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets the peak resident set size (VmHWM) of this process.
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration and return measured bytes (called in a fresh process)."""
    torch.manual_seed(0)
    torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    net = (
        UNet3D(1, 3, features=tuple(spec["features"]), norm=spec["norm"], checkpoint=spec["checkpoint"])
        .to(device)
        .train()
    )
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    edge, batch = int(spec["edge"]), int(spec["batch"])
    x = torch.randn(batch, 1, edge, edge, edge, device=device)
    target = (x[:, 0] > 0).long()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            outs = net(x)
            loss = sum(
                F.cross_entropy(o.float(), target[:, :: 2**i, :: 2**i, :: 2**i]) / 2**i for i, o in enumerate(outs)
            )
        loss.backward()
        opt.step()

    step()  # warm-up: optimizer state, allocator pools, one-time library buffers
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - before
    else:
        before = _rss_bytes("VmRSS")
        _reset_peak_rss()
        step()
        measured = _rss_bytes("VmHWM") - before
    return {"measured_bytes": int(measured)}


def _estimate(spec: dict[str, Any]) -> dict[str, int]:
    with torch.device("meta"):
        net = UNet3D(1, 3, features=tuple(spec["features"]), norm=spec["norm"], checkpoint=spec["checkpoint"])
    edge = int(spec["edge"])
    info = summary(net, (1, edge, edge, edge), int(spec["batch"]), getattr(torch, spec["dtype"]))
    step_bytes = info["activation_bytes"] + info["gradient_bytes"] + info["transient_bytes"]
    return {
        "estimate_step_bytes": int(step_bytes),
        "estimate_total_bytes": int(info["total_bytes"]),
        "macs": int(info["macs"]),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the smallest patch of each case")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args, ignored = parser.parse_known_args(argv)  # run_all.py passes its arguments to every script
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if ignored:
        print(f"ignoring arguments meant for other benchmarks: {ignored}", file=sys.stderr)
    on_gpu = args.device == "cuda"
    cases = GPU_CASES if on_gpu else CPU_CASES
    if args.quick:
        smallest = min(edge for _, _, edge in cases)
        cases = [c for c in cases if c[2] == smallest]
    rows = []
    for norm, ckpt, edge in cases:
        spec = {
            "device": args.device,
            "dtype": "bfloat16" if on_gpu else "float32",
            "features": list(GPU_FEATURES if on_gpu else CPU_FEATURES),
            "norm": norm,
            "checkpoint": ckpt,
            "edge": edge,
            "batch": 2,
            "threads": 1 if not on_gpu else os.cpu_count() or 1,
        }
        # A fixed glibc mmap threshold (64 KiB) turns off its dynamic raise after the first free, so
        # every tensor buffer is its own mapping, returned on free: RSS then follows live tensors.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
        cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        row = {**spec, **_estimate(spec), **json.loads(proc.stdout.strip().splitlines()[-1])}
        row["ratio_measured_to_estimate"] = round(row["measured_bytes"] / row["estimate_step_bytes"], 3)
        rows.append(row)
        print(
            f"{norm:12s} ckpt={ckpt!s:5s} {edge:3d}^3 x2 {spec['dtype']:8s} "
            f"estimate {row['estimate_step_bytes'] / MIB:9.1f} MiB  measured {row['measured_bytes'] / MIB:9.1f} MiB  "
            f"ratio {row['ratio_measured_to_estimate']:.3f}",
            flush=True,
        )
    name = torch.cuda.get_device_name() if on_gpu else "cpu"
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"model_memory_{'cuda' if on_gpu else 'cpu'}"
    atomic_write_json(stem.with_suffix(".json"), {"device": name, "versions": versions(), "rows": rows})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(stem.with_suffix(".csv"), buf.getvalue())
    print(f"wrote {stem}.json and .csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
