"""CPU mixed precision: fp32 vs bf16 autocast, contiguous vs channels_last_3d, side by side.

One training step (forward, Dice+CE over the deep-supervision heads, backward, AdamW) of the LA2018
CPU recipe's U-Net at batch 2, and one whole-scan sliding-window prediction, for each of the four
settings, interleaved round by round so that every setting sees the same machine state. A fifth
setting runs bf16 channels_last_3d with the GroupNorm of medgn 0.1 (every bf16 input copied to
float32, ATen's channels-last backward): the previous recipe, for the gain of the current one.
Reported: median seconds per step / per scan and the speed-up against fp32 contiguous. Results go
to ``benchmarks/results/cpu_amp.json``.

Usage: ``python benchmarks/bench_cpu_amp.py [--threads 2] [--rounds 7] [--config configs/la2018_cpu.yaml]``
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from medgn.config import load_run_config
from medgn.environment import cpu_bf16_supported, versions
from medgn.files import atomic_write_json
from medgn.infer.sliding_window import WindowSettings, predict_probabilities
from medgn.models.registry import build_model
from medgn.planning.planner import strides_and_kernels
from medgn.train.losses import DeepSupervisionLoss, DiceCELoss

RESULTS = Path(__file__).resolve().parent / "results"
# (precision, layout, GroupNorm): "aten" is medgn's torch backend, "copy" the float32 copy of 0.1.
SETTINGS = [
    ("fp32", "contiguous", "aten"),
    ("fp32", "channels_last_3d", "aten"),
    ("bf16", "contiguous", "aten"),
    ("bf16", "channels_last_3d", "aten"),
    ("bf16", "channels_last_3d", "copy"),
]
_GN = importlib.import_module("medgn.ops.group_norm")  # the module (medgn.ops re-exports the function)
_ATEN = _GN._group_norm_native
# medgn 0.1's torch backend: every half input normalised as a float32 copy, in the input's layout.
_FLOAT32_COPY = _GN._aten_group_norm


def _key(precision: str, layout: str, gn: str) -> str:
    return f"{precision}/{layout}" + ("/gn-float32-copy" if gn == "copy" else "")


SCAN_MM = (125.0, 100.0, 55.0)  # a typical LA2018 scan: 200 x 160 x 88 voxels of 0.625 mm


def scan_shape(spacing: Any) -> tuple[int, ...]:
    """The typical scan at the config's spacing (voxels per axis)."""
    return tuple(max(1, round(mm / float(s))) for mm, s in zip(SCAN_MM, spacing, strict=True))


def _autocast(precision: str) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--config", default="configs/la2018_cpu.yaml")
    parser.add_argument("--out", default=str(RESULTS / "cpu_amp.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_run_config(args.config)
    patch = tuple(int(p) for p in cfg.plan.patch_size)
    strides, kernels = strides_and_kernels(patch, cfg.plan.target_spacing)
    strides, kernels = strides[: len(cfg.model.features)], kernels[: len(cfg.model.features)]
    models, opts = {}, {}
    for setting in SETTINGS:
        torch.manual_seed(0)
        mcfg = type(cfg.model)(**{**cfg.model.__dict__, "memory_format": setting[1]})
        model = build_model(mcfg, 1, 2, strides, kernels)
        models[setting] = model
        opts[setting] = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    loss_fn = DeepSupervisionLoss(DiceCELoss(1.0, 1.0))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, 1, *patch), generator=gen)
    y = (torch.rand((2, 1, *patch), generator=gen) > 0.7).long()
    scan_size = scan_shape(cfg.plan.target_spacing)
    scan = torch.randn((1, *scan_size), generator=gen)
    windows = {p: WindowSettings(roi_size=patch, overlap=0.25, sw_batch_size=2, precision=p) for p in ("fp32", "bf16")}
    step_s: dict[str, list[float]] = {_key(*s): [] for s in SETTINGS}
    infer_s: dict[str, list[float]] = {_key(*s): [] for s in SETTINGS}
    for r in range(args.rounds + 1):  # round 0 warms up every setting (oneDNN primitive caches)
        for precision, layout, gn in SETTINGS:
            setting = (precision, layout, gn)
            key, model, opt = _key(*setting), models[setting], opts[setting]
            _GN._group_norm_native = _FLOAT32_COPY if gn == "copy" else _ATEN
            model.train()
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with _autocast(precision):
                out = model(x.contiguous(memory_format=torch.channels_last_3d) if layout != "contiguous" else x)
            loss = loss_fn(out, y)
            loss.backward()
            opt.step()
            elapsed = time.perf_counter() - start
            model.eval()
            start = time.perf_counter()
            predict_probabilities([model], scan, windows[precision], device="cpu")
            elapsed_infer = time.perf_counter() - start
            if r:
                step_s[key].append(elapsed)
                infer_s[key].append(elapsed_infer)
    base_step = statistics.median(step_s["fp32/contiguous"])
    base_inf = statistics.median(infer_s["fp32/contiguous"])
    rows = []
    _GN._group_norm_native = _ATEN
    print(f"{'setting':44s} {'step s':>8s} {'x fp32':>7s} {'scan s':>8s} {'x fp32':>7s}")
    for precision, layout, gn in SETTINGS:
        key = _key(precision, layout, gn)
        ms, mi = statistics.median(step_s[key]), statistics.median(infer_s[key])
        rows.append(
            {
                "precision": precision,
                "layout": layout,
                "group_norm": "float32 copy (0.1)" if gn == "copy" else "aten",
                "step_median_s": ms,
                "step_speedup": base_step / ms,
                "infer_median_s": mi,
                "infer_speedup": base_inf / mi,
            }
        )
        print(f"{key:44s} {ms:8.3f} {base_step / ms:7.2f} {mi:8.3f} {base_inf / mi:7.2f}")
    # The recipe trains contiguous and infers channels-last (model.memory_format, infer.memory_format).
    before = "bf16/channels_last_3d/gn-float32-copy"
    recipe = {
        "train": "bf16/contiguous",
        "infer": "bf16/channels_last_3d",
        "step_speedup_vs_before": statistics.median(step_s[before]) / statistics.median(step_s["bf16/contiguous"]),
        "infer_speedup_vs_before": statistics.median(infer_s[before])
        / statistics.median(infer_s["bf16/channels_last_3d"]),
    }
    print(
        f"recipe (train bf16 contiguous, infer bf16 channels-last) vs before (bf16 channels-last, float32-copy "
        f"GroupNorm): step x{recipe['step_speedup_vs_before']:.2f}, scan x{recipe['infer_speedup_vs_before']:.2f}"
    )
    result = {
        "machine": f"{platform.machine()}, {args.threads} threads, avx512_bf16={cpu_bf16_supported()}",
        "versions": versions(),
        "config": args.config,
        "patch": list(patch),
        "batch": 2,
        "scan_shape": list(scan_size),
        "rounds": args.rounds,
        "rows": rows,
        "recipe": recipe,
    }
    atomic_write_json(Path(args.out), json.loads(json.dumps(result)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
