"""Training speed and memory: medgn GroupNorm vs ``nn.GroupNorm`` vs InstanceNorm, eager and compiled.

For each norm (``group``: medgn's fused Triton GroupNorm; ``group_torch``: ``nn.GroupNorm``;
``instance``) and each variant (``eager``; ``compile``: the model under ``torch.compile``) the
same 3D U-Net (nnU-Net widths, deep supervision, strides from the planner's rule) runs full trainer
steps (``Trainer.train_step``: bf16 autocast, Dice+CE over the heads, gradient clipping, SGD
Nesterov) at batch 2 on two patches: 128^3 and the LA2018 GPU recipe's plan patch 192x128x80
(0.625 mm, configs/la2018.yaml). Reported per row: median iterations/s over timed windows, peak
GPU memory (``torch.cuda.max_memory_allocated``) during the timed steps, and the planner's
estimate of that peak (``medgn.models.summary.estimate_training_memory_bytes``, bf16
activations) beside it. CUDA only; without a GPU it says so and exits 0, unless ``--device cpu``
asks for a smoke run (small widths, a 16^3 patch, fp32) that checks the script works. Results:
``<out>/train_<cuda|cpu>.json`` and ``.csv``, rewritten after every row.

Usage: ``python benchmarks/bench_train.py [--device cuda|cpu] [--quick] [--norms group,instance]
[--variants eager,compile] [--compile-backend inductor] [--out DIR]``
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
from medgn.models.config import UNet3DConfig
from medgn.models.registry import build_model
from medgn.models.summary import estimate_training_memory_bytes
from medgn.planning.planner import strides_and_kernels
from medgn.train.config import TrainConfig
from medgn.train.trainer import Trainer

RESULTS = Path(__file__).resolve().parent / "results"
NORMS = ("group", "group_torch", "instance")
VARIANTS = ("eager", "compile")
GPU_FEATURES = (32, 64, 128, 256, 320, 320)  # nnU-Net's default widths
CPU_FEATURES = (8, 16, 32)  # smoke run: three stages, seconds on two cores
# 128^3 and the LA2018 plan patch (README: 0.625 mm, 192x128x80 at batch 2).
GPU_PATCHES = ((128, 128, 128), (192, 128, 80))
CPU_PATCHES = ((16, 16, 16),)
CLASSES = 3  # background + 2 structures, like a small multi-organ task
MIB = 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_cfg(norm: str, features: tuple[int, ...], patch: tuple[int, ...]):  # noqa: ANN202
    """(UNet3DConfig, strides, kernels) for a patch, strides by the planner's rule (1 mm grid)."""
    strides, kernels = strides_and_kernels(patch, [1.0, 1.0, 1.0])
    stages = min(len(strides), len(features))
    cfg = UNet3DConfig(features=tuple(features[:stages]), norm=norm, deep_supervision=True)
    return cfg, strides[:stages], kernels[:stages]


def measure(norm: str, variant: str, patch: tuple[int, ...], batch: int, device: torch.device,
            timing: tuple[int, int, int], backend: str) -> dict[str, Any]:  # fmt: skip
    """Run warm-up steps, then timed windows of steps; return the row."""
    warmup, windows, steps = timing
    features = GPU_FEATURES if device.type == "cuda" else CPU_FEATURES
    cfg, strides, kernels = _model_cfg(norm, features, patch)
    model = build_model(cfg, 1, CLASSES, strides, kernels)
    amp = "bf16" if device.type == "cuda" else "off"
    estimate = estimate_training_memory_bytes(
        cfg, 1, CLASSES, strides, kernels, patch, batch,
        torch.bfloat16 if amp == "bf16" else torch.float32,
    )  # fmt: skip
    tcfg = build(
        TrainConfig,
        {"amp": amp, "batch_size": batch, "epochs": 1, "iters_per_epoch": 100_000},  # the bound: a long schedule
        "train",
    )
    trainer = Trainer(model, tcfg, lambda epoch, start: iter(()), device=device)
    if variant == "compile":
        # Compile the forward the trainer calls; parameters and state_dict stay the module's.
        trainer.model.forward = torch.compile(trainer.model.forward, backend=backend)
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(batch, 1, *patch, generator=gen).to(device)
    label = torch.randint(0, CLASSES, (batch, 1, *patch), generator=gen).to(device)
    micro = [{"image": image, "label": label, "case_id": ["bench"] * batch}]
    t0 = time.perf_counter()
    for _ in range(warmup):
        trainer.train_step(micro)
    _sync(device)
    warmup_s = time.perf_counter() - t0
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
    return {"norm": norm, "variant": variant, "patch": "x".join(map(str, patch)), "batch": batch,
            "amp": amp, "features": list(cfg.features), "it_per_s_median": statistics.median(rates),
            "it_per_s_all": rates, "warmup_s": round(warmup_s, 2), "peak_mib": peak,
            "estimate_mib": round(estimate / MIB, 1),
            "peak_over_estimate": round(peak * MIB / estimate, 3) if peak else None}  # fmt: skip


def _write(out: Path, name: str, rows: list[dict[str, Any]]) -> Path:
    tag = "cpu" if name == "cpu" else "cuda"
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    fields = [
        "device",
        "norm",
        "variant",
        "patch",
        "batch",
        "it_per_s_median",
        "peak_mib",
        "estimate_mib",
        "error",
    ]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({"device": name, **r} for r in rows)
    atomic_write_text(out / f"train_{tag}.csv", buf.getvalue())
    return atomic_write_json(out / f"train_{tag}.json", {"device": name, "versions": versions(), "rows": rows})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="128^3 only, fewer timed steps")
    parser.add_argument("--norms", default=",".join(NORMS), help=f"comma list of {NORMS}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {VARIANTS}")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    norms, variants = args.norms.split(","), args.variants.split(",")
    for value, allowed, flag in ((norms, NORMS, "--norms"), (variants, VARIANTS, "--variants")):
        if not set(value) <= set(allowed):
            print(
                f"medgn: error: {flag}: unknown value (got {','.join(value)}, expected a subset of {','.join(allowed)})"
            )
            return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_train: no CUDA device; nothing measured (use --device cpu for a smoke run)")
        return 0
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    patches = (GPU_PATCHES[:1] if args.quick else GPU_PATCHES) if cuda else CPU_PATCHES
    # GPU: 5 warm-up steps (cuDNN autotune, allocator, compilation), 5 windows of 10 steps;
    # quick: 3 warm-up steps, 3 windows of 3; CPU smoke: minimal.
    timing = ((3, 3, 3) if args.quick else (5, 5, 10)) if cuda else (1, 2, 1)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    rows: list[dict[str, Any]] = []
    for patch in patches:
        for variant in variants:
            for norm in norms:
                try:
                    row = measure(norm, variant, patch, args.batch, device, timing, args.compile_backend)
                except torch.OutOfMemoryError:
                    row = {"norm": norm, "variant": variant, "patch": "x".join(map(str, patch)), "batch": args.batch,
                           "it_per_s_median": None, "peak_mib": None, "error": "out of memory"}  # fmt: skip
                if cuda:
                    torch.cuda.empty_cache()
                rows.append(row)
                peak = f"{row['peak_mib']:.0f} MiB" if row.get("peak_mib") is not None else "-"
                est = f"{row['estimate_mib']:.0f} MiB" if row.get("estimate_mib") is not None else "-"
                rate = (
                    f"{row['it_per_s_median']:.3f} it/s" if row.get("it_per_s_median") is not None else row.get("error")
                )
                print(
                    f"{norm:12s} {variant:8s} patch {row['patch']} batch {args.batch}: {rate}, peak {peak}, "
                    f"planner estimate {est}",
                    flush=True,
                )
                _write(args.out, name, rows)
    print(f"wrote {args.out / ('train_' + ('cuda' if cuda else 'cpu') + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
