"""How a prediction goes back to the scan's grid: probabilities or logits, on held-out folds.

A model predicts on the plan's grid (1.5 mm for the LA2018 CPU recipe); the mask is written on the
scan's own grid (0.625 mm). Between coarse voxels the class can be decided from interpolated
probabilities, or from interpolated log-probabilities, which decide like interpolated logits (as
nnU-Net does). This benchmark predicts every held-out case of each fold once, with the fold's
trained model and its inference defaults (mirroring, precision, post-processing), inverts the same
probabilities both ways, and reports per way the pooled Dice, the worst case and the paired
difference (mean, cases better and worse). ``medgn infer`` uses
:func:`medgn.data.prepare.invert_probabilities` (log-probabilities), after the same
:func:`medgn.data.prepare.prepare` this benchmark preprocesses with.

Usage::

    python benchmarks/invert_folds.py --folds runs/vs_monai_g0 runs/vs_monai_f1 ... --threads 2 \\
        --out benchmarks/results/la2018_invert.json

Each fold folder is a ``benchmarks/vs_monai.py`` work folder (``medgn/medgn_run``, ``val_images``,
``val_labels``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medgn.data.io import read_volume  # noqa: E402
from medgn.data.prepare import invert_probabilities, invert_to_input, prepare  # noqa: E402
from medgn.infer import postprocess  # noqa: E402
from medgn.infer.case import class_indices  # noqa: E402
from medgn.infer.predictor import load_predictor  # noqa: E402
from medgn.infer.sliding_window import WindowSettings, predict_probabilities, resolve_precision  # noqa: E402

WAYS = ("probabilities", "log_probabilities")


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    total = int(pred.sum()) + int(ref.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, ref).sum()) / total


def fold_scores(fold: Path, threads: int) -> dict[str, dict[str, float]]:
    """Dice of class 1 per held-out case of ``fold``, for each way of inverting."""
    run = fold / "medgn" / "medgn_run"
    predictor = load_predictor([str(run)], "cpu")
    defaults = predictor.defaults
    settings = WindowSettings(
        roi_size=predictor.plan.patch_size,
        overlap=0.5,
        sw_batch_size=2,
        tta=bool(defaults.tta),
        mirror_axes=tuple(defaults.mirror_axes) if defaults.tta else (0, 1, 2),
        precision=resolve_precision(predictor.device, "auto"),
    )  # type: ignore[arg-type]
    decision = postprocess.PostProcessing.load(run)
    scores: dict[str, dict[str, float]] = {way: {} for way in WAYS}
    for image_path in sorted((fold / "val_images").glob("*.nii.gz")):
        data = prepare([read_volume(image_path)], predictor.plan)
        probs = predict_probabilities(predictor.models, data.image, settings, threads=threads)
        ref = read_volume(fold / "val_labels" / image_path.name, label=True).array > 0
        for way in WAYS:
            back = invert_to_input(probs, data) if way == "probabilities" else invert_probabilities(probs, data)
            classes = class_indices(back)
            if decision is not None:
                classes = postprocess.apply(classes, decision)
            scores[way][f"{fold.name}/{image_path.name}"] = dice(classes > 0, ref)
        print(
            f"{fold.name}/{image_path.name}: "
            + ", ".join(f"{way} {scores[way][f'{fold.name}/{image_path.name}']:.4f}" for way in WAYS),
            flush=True,
        )
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", nargs="+", type=Path, required=True, help="vs_monai work folders, one per fold")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True, help="JSON to write (a Markdown table goes beside it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    scores: dict[str, dict[str, float]] = {way: {} for way in WAYS}
    for fold in args.folds:
        for way, cases in fold_scores(fold, args.threads).items():
            scores[way].update(cases)
    base, new = scores["probabilities"], scores["log_probabilities"]
    diff = [new[c] - base[c] for c in base]
    summary: dict[str, Any] = {
        "machine": f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}",
        "folds": [f.name for f in args.folds],
        "cases": len(base),
        "ways": {
            way: {
                "dice_mean": round(statistics.fmean(scores[way].values()), 4),
                "dice_median": round(statistics.median(scores[way].values()), 4),
                "dice_min": round(min(scores[way].values()), 4),
            }
            for way in WAYS
        },
        "log_minus_prob": {
            "mean": round(statistics.fmean(diff), 4),
            "better": sum(d > 0 for d in diff),
            "worse": sum(d < 0 for d in diff),
        },
        "per_case": scores,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    lines = [
        f"# Inverting predictions to the scan's grid ({summary['cases']} held-out cases, {summary['machine']})",
        "",
        "`python benchmarks/invert_folds.py --folds " + " ".join(f"runs/{f}" for f in summary["folds"]) + "`",
        "",
        "| interpolated | Dice mean | median | worst |",
        "|---|---|---|---|",
        *(
            f"| {way.replace('_', '-')} | {s['dice_mean']:.4f} | {s['dice_median']:.4f} | {s['dice_min']:.4f} |"
            for way, s in summary["ways"].items()
        ),
        "",
        f"Log-probabilities minus probabilities, paired: {summary['log_minus_prob']['mean']:+.4f} Dice, "
        f"{summary['log_minus_prob']['better']} cases better, {summary['log_minus_prob']['worse']} worse.",
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
