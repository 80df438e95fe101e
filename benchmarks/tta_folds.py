"""Test-time mirroring on held-out folds: which flips pay for their time, measured with ``medgn infer``.

Takes the work folders of ``benchmarks/vs_monai.py`` runs (one per cross-validation fold: the trained
``medgn/medgn_run``, the fold's ``val_images`` and ``val_labels``, and the MONAI script's
``monai/monai_eval`` when it ran), predicts every fold's held-out cases with each mirroring variant
through the command line a user runs (``--no-tta``, ``--tta --mirror-axes 0,1``...), scores them with
``medgn evaluate``, and reports per variant the pooled Dice, the worst case, HD95, the paired gain over
no mirroring (mean and cases improved) and the wall time per scan (whole command, start-up included,
median over folds); and the MONAI script's pooled Dice on the folds where it ran, beside each variant's
on the same cases.

Usage::

    python benchmarks/tta_folds.py --folds runs/vs_monai_f1 runs/vs_monai_f2 ... --threads 2 \\
        --variants none 0,1 0,2 1,2 0,1,2 --out benchmarks/results/la2018_tta.json

Writes the JSON and a Markdown table next to it (``.md``). The machine must be otherwise idle.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_monai  # noqa: E402  (the same subprocess runner and thread settings)


def variant_args(variant: str) -> list[str]:
    """``medgn infer`` options of a variant: "none" or a comma list of mirror axes."""
    if variant == "none":
        return ["--no-tta"]
    return ["--tta", "--mirror-axes", variant]


def case_dice(eval_dir: Path) -> dict[str, tuple[float, float]]:
    """(Dice, HD95) of class 1 per case from ``medgn evaluate``'s metrics.csv."""
    rows = csv.DictReader((eval_dir / "metrics.csv").open(encoding="utf-8"))
    return {r["case"]: (float(r["dice"]), float(r["hd95"])) for r in rows if r["label"] == "1"}


def summarise(
    per_variant: dict[str, dict[str, tuple[float, float]]], seconds: dict[str, list[float]], baseline: str = "none"
) -> dict[str, dict[str, Any]]:
    """Pooled scores per variant and the paired gain over ``baseline`` (cases present in both)."""
    out: dict[str, dict[str, Any]] = {}
    base = per_variant.get(baseline, {})
    for name, cases in per_variant.items():
        dice = [d for d, _ in cases.values()]
        hd95 = [h for _, h in cases.values() if math.isfinite(h)]
        row: dict[str, Any] = {
            "cases": len(dice),
            "dice_mean": round(statistics.fmean(dice), 4),
            "dice_median": round(statistics.median(dice), 4),
            "dice_min": round(min(dice), 4),
            "hd95_mean": round(statistics.fmean(hd95), 2) if hd95 else None,
            "seconds_per_scan": round(statistics.median(seconds[name]), 2) if seconds.get(name) else None,
        }
        shared = sorted(set(cases) & set(base))
        if name != baseline and shared:
            diffs = [cases[c][0] - base[c][0] for c in shared]
            row["gain_mean"] = round(statistics.fmean(diffs), 4)
            row["cases_improved"] = sum(d > 0 for d in diffs)
            row["cases_worse"] = sum(d < 0 for d in diffs)
        out[name] = row
    return out


def against_monai(
    per_variant: dict[str, dict[str, tuple[float, float]]], monai: dict[str, tuple[float, float]]
) -> dict[str, Any]:
    """The MONAI script's pooled Dice on the folds it ran on, and each variant's on the same cases."""
    cases = sorted(monai)
    out: dict[str, Any] = {
        "cases": len(cases),
        "folds": sorted({c.split("/")[0] for c in cases}),
        "dice_mean": round(statistics.fmean(monai[c][0] for c in cases), 4),
        "medgn_dice_mean": {},
        "medgn_ahead": {},
    }
    for name, scores in per_variant.items():
        shared = [c for c in cases if c in scores]
        if len(shared) == len(cases):
            out["medgn_dice_mean"][name] = round(statistics.fmean(scores[c][0] for c in shared), 4)
            out["medgn_ahead"][name] = sum(scores[c][0] > monai[c][0] for c in shared)
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Test-time mirroring on held-out folds",
        "",
        f"Machine: {result['machine']}, {result['threads']} threads. Folds: {', '.join(result['folds'])}.",
        "Each variant is `medgn infer` with the options shown, on every fold's held-out cases; seconds per",
        "scan are the whole command's wall time (start-up included), median over folds.",
        "",
        "| variant | options | Dice mean | median | worst | HD95 (mm) | gain vs none | better / worse | s/scan |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["variants"].items():
        gain = f"{row['gain_mean']:+.4f}" if "gain_mean" in row else ""
        counts = f"{row['cases_improved']} / {row['cases_worse']}" if "gain_mean" in row else ""
        lines.append(
            f"| {name} | `{' '.join(variant_args(name))}` | {row['dice_mean']:.4f} | {row['dice_median']:.4f} | "
            f"{row['dice_min']:.3f} | {row['hd95_mean']} | {gain} | {counts} | {row['seconds_per_scan']} |"
        )
    monai = result.get("monai")
    if monai:
        lines += [
            "",
            f"The MONAI script (`benchmarks/vs_monai.py`) on the {monai['cases']} held-out cases of "
            f"{', '.join(monai['folds'])}: Dice {monai['dice_mean']:.4f}. medgn on the same cases:",
            "",
            "| variant | Dice mean | ahead of MONAI by | cases ahead |",
            "|---|---|---|---|",
        ]
        for name, dice in monai["medgn_dice_mean"].items():
            lines.append(
                f"| {name} | {dice:.4f} | {dice - monai['dice_mean']:+.4f} | "
                f"{monai['medgn_ahead'][name]} of {monai['cases']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", nargs="+", required=True, help="vs_monai work folders, one per fold")
    parser.add_argument("--variants", nargs="+", default=["none", "0,1", "0,1,2"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if "none" not in args.variants:
        args.variants = ["none", *args.variants]
    per_variant: dict[str, dict[str, tuple[float, float]]] = {v: {} for v in args.variants}
    seconds: dict[str, list[float]] = {v: [] for v in args.variants}
    monai: dict[str, tuple[float, float]] = {}
    medgn = [sys.executable, "-m", "medgn"]
    for fold in map(Path, args.folds):
        run, images, labels = fold / "medgn" / "medgn_run", fold / "val_images", fold / "val_labels"
        for needed in (run, images, labels):
            if not needed.is_dir():
                raise SystemExit(f"tta_folds: {needed}: missing (expected a benchmarks/vs_monai.py work folder)")
        n = len(list(images.iterdir()))
        for variant in args.variants:
            work = fold / "tta" / variant.replace(",", "-")
            shutil.rmtree(work, ignore_errors=True)  # every case predicted again: no skipped case in the timing
            work.mkdir(parents=True)
            pred = work / "pred"
            cmd = [*medgn, "infer", "--model", str(run), "--input", str(images), "--output", str(pred)]
            wall = vs_monai._run([*cmd, "--no-progress", *variant_args(variant)], args.threads, work / "infer.log")
            vs_monai._run(
                [
                    *medgn,
                    "evaluate",
                    "--pred",
                    str(pred),
                    "--ref",
                    str(labels),
                    "--out",
                    str(work / "eval"),
                ],
                args.threads,
                work / "eval.log",
            )
            seconds[variant].append(wall / n)
            per_variant[variant].update({f"{fold.name}/{c}": v for c, v in case_dice(work / "eval").items()})
            print(f"tta_folds: {fold.name} {variant}: {wall / n:.2f} s/scan", flush=True)
        if (fold / "monai" / "monai_eval" / "metrics.csv").exists():
            monai.update({f"{fold.name}/{c}": v for c, v in case_dice(fold / "monai" / "monai_eval").items()})
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "threads": args.threads,
        "folds": [Path(f).name for f in args.folds],
        "variants": summarise(per_variant, seconds),
    }
    if monai:
        result["monai"] = against_monai(per_variant, monai)
    from medgn.files import atomic_write_json, atomic_write_text

    out = Path(args.out)
    atomic_write_json(out, result)
    atomic_write_text(out.with_suffix(".md"), markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
