"""LA2018 end to end with the CPU recipe: train one fold in a time budget, infer, evaluate, report.

Runs exactly the commands a user would (printed as it goes):

    medgn train --config configs/la2018_cpu.yaml --data LA2018 --out OUT/run --fold 0 --time-budget 30m
    medgn infer --model OUT/run --input OUT/val/images --output OUT/pred
    medgn evaluate --pred OUT/pred --ref OUT/val/labels --out OUT/eval

The validation cases of the fold are linked into ``OUT/val`` so inference runs on the original
full-resolution scans and evaluation compares with the original labels (Dice, HD95, NSD in mm).
The result table is printed and written to ``benchmarks/results/la2018_<recipe>.{json,md}`` with the
machine, versions and the commands. Usage::

    python benchmarks/la2018.py [--data ../shared/data/LA2018] [--out runs/la2018_cpu]
                                [--config configs/la2018_cpu.yaml] [--budget 30m] [--fold 0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def _medgn(args: list[str]) -> None:
    print(f"\n$ medgn {shlex.join(args)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "medgn", *args], check=False)
    if proc.returncode != 0:
        raise SystemExit(f"medgn {args[0]} failed with exit code {proc.returncode}")


def _link_val_cases(data: Path, run: Path, fold: int, dest: Path) -> int:
    desc = json.loads((data / "dataset.json").read_text())
    splits = json.loads((run / "splits.json").read_text())
    val = set(splits[fold]["val"])
    (dest / "images").mkdir(parents=True, exist_ok=True)
    (dest / "labels").mkdir(parents=True, exist_ok=True)
    count = 0
    for case in desc["training"]:
        image = (data / case["image"]).resolve()
        name = image.name
        if name.replace(".nii.gz", "") not in val:
            continue
        for src, folder in ((image, "images"), ((data / case["label"]).resolve(), "labels")):
            link = dest / folder / name
            if not link.exists():
                link.symlink_to(src)
        count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "LA2018")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "la2018_cpu")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "la2018_cpu.yaml")
    parser.add_argument("--budget", default="30m", help="training time budget")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--name", default=None, help="results file stem (default la2018_<config stem>)")
    args = parser.parse_args(argv)
    if not (args.data / "dataset.json").is_file():
        print(f"LA2018 not found at {args.data}; pass --data", file=sys.stderr)
        return 2
    run, val, pred, ev = args.out / "run", args.out / "val", args.out / "pred", args.out / "eval"
    start = time.monotonic()
    train = [
        "train",
        "--config",
        str(args.config),
        "--data",
        str(args.data),
        "--out",
        str(run),
        "--fold",
        str(args.fold),
        "--time-budget",
        args.budget,
        "--device",
        args.device,
        "--no-progress",
    ]
    if (run / "checkpoints" / "final.json").exists():
        print(f"{run} already trained; reusing it")
    else:
        if (run / "checkpoints").exists():
            train.append("--resume")
        _medgn(train)
    train_s = time.monotonic() - start
    n_val = _link_val_cases(args.data, run, args.fold, val)
    t0 = time.monotonic()
    _medgn(
        [
            "infer",
            "--model",
            str(run),
            "--input",
            str(val / "images"),
            "--output",
            str(pred),
            "--device",
            args.device,
            "--no-progress",
        ]
    )
    infer_s = time.monotonic() - t0
    _medgn(
        [
            "evaluate",
            "--pred",
            str(pred),
            "--ref",
            str(val / "labels"),
            "--out",
            str(ev),
            "--images",
            str(val / "images"),
            "--overwrite",
        ]
    )
    summary = json.loads((ev / "summary.json").read_text())
    train_summary = json.loads((run / "train_summary.json").read_text())
    stats = summary["per_class"]["1"]
    import torch

    result = {
        "dataset": "LA2018 (80 training cases, MSD format)",
        "fold": args.fold,
        "validation_cases": n_val,
        "config": str(args.config.relative_to(REPO)) if args.config.is_relative_to(REPO) else str(args.config),
        "budget": args.budget,
        "device": args.device,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        if args.device == "cpu"
        else torch.cuda.get_device_name(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "train": train_summary,
        "train_minutes": round(train_s / 60, 1),
        "infer_seconds_per_case": round(infer_s / max(n_val, 1), 1),
        "dice": stats["dice"],
        "hd95_mm": stats["hd95"],
        "assd_mm": stats["assd"],
        "nsd_2mm": stats["nsd"],
        "iou": stats["iou"],
        "commands": [
            shlex.join(["medgn", *train]),
            f"medgn infer --model {run} --input {val / 'images'} --output {pred}",
            f"medgn evaluate --pred {pred} --ref {val / 'labels'} --out {ev}",
        ],
    }
    # Paths as a reader of the repository would type them.
    result["commands"] = [
        c.replace(f"{REPO}/", "").replace(f"{REPO.parent}/shared", "../shared") for c in result["commands"]
    ]
    stem = args.name or f"la2018_{args.config.stem.replace('la2018_', '')}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    fmt = lambda s: f"{s['mean']:.4f} ± {s['std']:.4f} (median {s['median']:.4f})"  # noqa: E731
    table = "\n".join(
        [
            f"# LA2018, fold {args.fold} ({n_val} validation cases), {result['config']}, budget {args.budget}",
            "",
            f"Machine: {result['machine']}; torch {torch.__version__}. Training: "
            f"{train_summary['iteration']} steps in {result['train_minutes']} min "
            f"({train_summary['stop_reason']}); inference {result['infer_seconds_per_case']} s per case "
            "(full-resolution scans, no TTA).",
            "",
            "| metric | value |",
            "|---|---|",
            f"| Dice | {fmt(stats['dice'])} |",
            f"| IoU | {fmt(stats['iou'])} |",
            f"| HD95 (mm) | {fmt(stats['hd95'])} |",
            f"| ASSD (mm) | {fmt(stats['assd'])} |",
            f"| NSD @ 2 mm | {fmt(stats['nsd'])} |",
            "",
            "Commands:",
            "",
            *[f"    {c}" for c in result["commands"]],
            "",
        ]
    )
    (RESULTS / f"{stem}.md").write_text(table)
    print("\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
