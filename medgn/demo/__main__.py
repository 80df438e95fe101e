"""``python -m medgn.demo`` (``make demo``): medgn's whole job on real anatomy in a few minutes.

Builds the MNI152 demo dataset (see :mod:`medgn.demo.make_dataset`), then runs the same commands
a user types, printing each one: ``medgn verify``, ``medgn plan``, ``medgn train`` (CPU, or the
GPU when present, within a time budget), ``medgn infer`` on the held-out subjects and ``medgn
evaluate`` against their reference labels. Ends with the Dice table and where the report, the
overlays and the training progress plot are.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from medgn.cli import OneLineParser
from medgn.cli import main as medgn_main
from medgn.demo.make_dataset import build_demo_dataset
from medgn.errors import MedgnError, UsageError
from medgn.files import is_inside

DEMO_CONFIG = Path(__file__).with_name("demo.yaml")  # package data: the demo runs from a wheel too
# A demo folder is marked when it is made; only a marked (or an empty) folder is replaced by the next
# demo. Names alone cannot tell: a project folder may hold its own dataset/ or run/.
MARKER = ".medgn-demo"
# What a demo folder holds besides its marker.
DEMO_ENTRIES = frozenset({MARKER, "dataset", "run", "predictions", "evaluation", "plan.json", "splits.json"})
DEMO_NAME = "MNI152-demo"  # the dataset.json name of the demo's dataset (folders from before the marker)


def _is_earlier_demo(out: Path) -> bool:
    if (out / MARKER).is_file():
        return True
    try:  # a demo folder made before the marker existed: its dataset is the demo's
        return json.loads((out / "dataset" / "dataset.json").read_text(encoding="utf-8")).get("name") == DEMO_NAME
    except (OSError, ValueError, AttributeError):
        return False


def _replace_demo_folder(out: Path) -> None:
    """Empty ``out`` for a new demo and mark it; refuse a file, a link, the current folder or one above
    it, and a folder holding anything but an earlier demo."""
    if out.is_symlink():
        raise UsageError(out, "demo output path is a symbolic link", expected="a real folder for the demo (--out)")
    if out.exists() and not out.is_dir():
        raise UsageError(out, "demo output path exists and is not a folder", expected="a folder for the demo")
    if is_inside(Path.cwd(), out):
        raise UsageError(
            out, "demo output folder holds the current folder", expected="a subfolder, e.g. --out demo_run"
        )
    if out.is_dir() and any(out.iterdir()):
        foreign = sorted(p.name for p in out.iterdir() if p.name not in DEMO_ENTRIES)
        if foreign or not _is_earlier_demo(out):
            raise UsageError(
                out,
                "refusing to replace a folder that is not a demo output",
                got=", ".join(foreign[:5]) or "no demo marker",
                expected="an empty folder, an earlier demo's folder, or a new --out",
            )
    try:
        if out.is_dir():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        (out / MARKER).write_text("made by python -m medgn.demo; the next demo replaces this folder\n")
    except OSError as exc:
        raise UsageError(out, f"cannot make the demo folder ({exc.strerror or exc})") from None


def _check_options(args: argparse.Namespace) -> None:
    """Everything the steps would refuse later, refused before the folder is replaced or minutes spent."""
    import torch

    from medgn.commands.train import parse_duration_minutes
    from medgn.config import load_run_config
    from medgn.environment import resolve_device

    if args.train_subjects < 2 or args.test_subjects < 1:
        raise UsageError(
            "--train-subjects/--test-subjects",
            "too few subjects",
            got=(args.train_subjects, args.test_subjects),
            expected=">= 2 training and >= 1 test subjects",
        )
    minutes = parse_duration_minutes(args.time_budget)
    load_run_config(args.config, [*args.set, f"train.time_budget_minutes={minutes}"])
    resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _run(args: list[str]) -> None:
    print(f"\n$ medgn {shlex.join(args)}", flush=True)
    code = medgn_main(args)
    if code != 0:
        raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python -m medgn.demo", description="Train, infer and evaluate on the MNI152 demo dataset."
    )
    parser.add_argument("--out", type=Path, default=Path("demo_run"), help="demo folder (replaced)")
    parser.add_argument(
        "--config", type=Path, default=DEMO_CONFIG, help="run config (default: the demo's, medgn/demo/demo.yaml)"
    )
    parser.add_argument(
        "--time-budget", default="8m", help="training time budget, a safety net on slow machines (default 8m)"
    )
    parser.add_argument("--train-subjects", type=int, default=8)
    parser.add_argument("--test-subjects", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--set", action="append", default=[], help="config override passed to medgn train")
    args = parser.parse_args(argv)
    try:
        return _demo(args)
    except MedgnError as exc:
        sys.stderr.write(f"medgn: error: {exc.one_line()}\n")
        return exc.code
    except KeyboardInterrupt:  # Ctrl-C while the dataset is built (the medgn steps handle their own)
        sys.stderr.write("medgn: stopped: interrupted; the next demo replaces the folder\n")
        return 130


def _demo(args: argparse.Namespace) -> int:
    start = time.monotonic()
    out = args.out
    _check_options(args)  # before anything is replaced
    _replace_demo_folder(out)
    dataset, run, pred, evaluation = out / "dataset", out / "run", out / "predictions", out / "evaluation"
    print(
        f"building {args.train_subjects} training and {args.test_subjects} test subjects from the MNI152 "
        f"template (nilearn) in {dataset}",
        flush=True,
    )
    build_demo_dataset(dataset, n_train=args.train_subjects, n_test=args.test_subjects)

    _run(["verify", str(dataset)])
    _run(["plan", str(dataset), "--out", str(out / "plan.json"), "--gpu-memory", "8"])
    train = [
        "train",
        "--config",
        str(args.config),
        "--data",
        str(dataset),
        "--out",
        str(run),
        "--plan",
        str(out / "plan.json"),
        "--time-budget",
        args.time_budget,
        "--no-progress",
    ]
    if args.device:
        train += ["--device", args.device]
    for item in args.set:
        train += ["--set", item]
    _run(train)
    infer = ["infer", "--model", str(run), "--input", str(dataset / "imagesTs"), "--output", str(pred)]
    if args.device:
        infer += ["--device", args.device]
    _run(infer)
    _run(
        [
            "evaluate",
            "--pred",
            str(pred),
            "--ref",
            str(dataset / "labelsTs"),
            "--out",
            str(evaluation),
            "--images",
            str(dataset / "imagesTs"),
        ]
    )

    summary = json.loads((evaluation / "summary.json").read_text())
    minutes = (time.monotonic() - start) / 60
    print(f"\ndemo finished in {minutes:.1f} min")
    names = {"1": "grey matter", "2": "white matter"}
    for label, stats in summary["per_class"].items():
        print(
            f"  {names.get(str(label), 'label ' + str(label)):<14} Dice {stats['dice']['mean']:.3f} (mean of "
            f"{stats['dice']['n']} held-out subjects)"
        )
    print(f"report:        {evaluation / 'report.md'}")
    print(f"box plot:      {evaluation / 'boxplot.png'}")
    print(f"overlays:      {evaluation / 'overlays'}")
    if (run / "progress.png").is_file():  # drawn once an epoch has finished
        print(f"training plot: {run / 'progress.png'}")
    print(f"masks:         {pred}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
