"""Training speed and memory: medgn GroupNorm vs ``nn.GroupNorm`` vs InstanceNorm, side by side.

For each norm the same 3D U-Net (nnU-Net widths, deep supervision) runs full trainer steps
(:meth:`medgn.train.trainer.Trainer.train_step`: bf16 autocast, Dice+CE over the heads, gradient
clipping, SGD Nesterov) on a 128^3 patch at batch 2. Reported: median iterations/s over timed
windows and peak GPU memory (``torch.cuda.max_memory_allocated``) during the timed steps. CUDA
only; without a GPU it says so and exits 0, unless ``--device cpu`` asks for a tiny smoke run
(small widths and patch) that checks the script works. Results go to
``benchmarks/results/train_<device>.{json,csv}``.

Usage: ``python benchmarks/bench_train.py [--patch 128] [--batch 2] [--device cuda|cpu] [--quick]``
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from medgn.configtools import build
from medgn.environment import versions
from medgn.files import atomic_write_json, atomic_write_text
from medgn.models import UNet3D
from medgn.train.config import TrainConfig
from medgn.train.trainer import Trainer

RESULTS = Path(__file__).resolve().parent / "results"
NORMS = ("group", "group_torch", "instance")
GPU_FEATURES = (32, 64, 128, 256, 320, 320)  # nnU-Net's default widths for a 128^3 patch
CPU_FEATURES = (8, 16, 32)  # smoke run: three stages, seconds on two cores
CLASSES = 3  # background + 2 structures, like a small multi-organ task
MIB = 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(norm: str, patch: int, batch: int, device: torch.device, warmup: int, windows: int, steps: int) -> dict[str, Any]:
    """Run ``warmup`` steps, then ``windows`` timed windows of ``steps`` steps; return the figures."""
    features = GPU_FEATURES if device.type == "cuda" else CPU_FEATURES
    model = UNet3D(1, CLASSES, features=features, norm=norm, deep_supervision=True)
    amp = "bf16" if device.type == "cuda" else "off"
    cfg = build(TrainConfig, {"amp": amp, "batch_size": batch, "epochs": 1, "iters_per_epoch": 10**6}, "train")
    trainer = Trainer(model, cfg, lambda epoch, start: iter(()), device=device)
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(batch, 1, patch, patch, patch, generator=gen).to(device)
    label = torch.randint(0, CLASSES, (batch, 1, patch, patch, patch), generator=gen).to(device)
    micro = [{"image": image, "label": label, "case_id": ["bench"] * batch}]
    for _ in range(warmup):
        trainer.train_step(micro)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rates = []
    for _ in range(windows):
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(micro)
        _sync(device)
        rates.append(steps / (time.perf_counter() - start))
    peak = torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None
    return {"norm": norm, "patch": patch, "batch": batch, "amp": amp, "features": list(features),
            "it_per_s_median": statistics.median(rates), "it_per_s_all": rates, "peak_mib": peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patch", type=int, default=None, help="cubic patch edge (default 128 on CUDA, 16 on CPU)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_train: no CUDA device; nothing measured (use --device cpu for a smoke run)")
        return 0
    device = torch.device(args.device)
    patch = args.patch or (128 if device.type == "cuda" else 16)
    # GPU: 5 warm-up steps (cuDNN autotune, allocator), 5 windows of 10 steps; CPU smoke: minimal.
    warmup, windows, steps = (5, 5, 10) if device.type == "cuda" and not args.quick else (1, 2, 2)
    rows = []
    for norm in NORMS:
        try:
            row = measure(norm, patch, args.batch, device, warmup, windows, steps)
        except torch.OutOfMemoryError:
            row = {"norm": norm, "patch": patch, "batch": args.batch, "it_per_s_median": None, "peak_mib": None, "error": "out of memory"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        peak = f"{row['peak_mib']:.0f} MiB" if row.get("peak_mib") is not None else "-"
        rate = f"{row['it_per_s_median']:.3f}" if row.get("it_per_s_median") is not None else row.get("error", "-")
        print(f"{norm:12s} patch {patch}^3 batch {args.batch}: {rate} it/s, peak {peak}", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if device.type == "cuda" else "cpu"
    atomic_write_json(RESULTS / f"train_{tag}.json", {"device": name, "versions": versions(), "rows": rows})
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["device", "norm", "patch", "batch", "it_per_s_median", "peak_mib"])
    for row in rows:
        writer.writerow([name, row["norm"], row["patch"], row["batch"], row.get("it_per_s_median"), row.get("peak_mib")])
    atomic_write_text(RESULTS / f"train_{tag}.csv", buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
