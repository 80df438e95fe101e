"""``medgn study norms``: BatchNorm vs GroupNorm (and others) across batch sizes on a dataset."""

from __future__ import annotations

import argparse
import math
from typing import Any

from medgn.commands.train import parse_fold
from medgn.errors import UsageError
from medgn.planning.splits import ALL_FOLDS
from medgn.train.config import MAX_SAMPLES_PER_EPOCH

MAX_BATCH = 1024  # train.batch_size's bound
MAX_ITERATIONS = 100_000  # train.iters_per_epoch's bound: every arm runs as one epoch


def _ints(text: str, flag: str, lo: int, hi: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(flag, "expected comma-separated integers", got=text) from None
    if not values:
        raise UsageError(flag, "empty list", got=text, expected="e.g. 1,2,4")
    if not all(lo <= v <= hi for v in values):
        raise UsageError(flag, "value out of range", got=text, expected=f"integers {lo}..{hi}")
    _distinct(values, flag, text)
    return values


def _distinct(values: list[Any], flag: str, text: str) -> None:
    """One arm per value: a repeated one would train into the folder of the first."""
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise UsageError(flag, f"{', '.join(repeated)} given twice", got=text, expected="each value once")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("study", help="experiments across settings (norms vs batch size)")
    studies = parser.add_subparsers(dest="study", metavar="STUDY", required=True)
    norms = studies.add_parser("norms", help="train each norm at each batch size for the same samples seen")
    norms.add_argument("--data", required=True, help="dataset folder")
    norms.add_argument("--out", required=True, help="study folder (study.csv, study.md, study.png, runs/)")
    norms.add_argument("--norms", default="batch,group,instance,group_torch", help="comma-separated norm names")
    norms.add_argument("--batch-sizes", default="1,2,4", help="comma-separated batch sizes")
    norms.add_argument(
        "--iterations", type=int, default=200, help="steps at the smallest batch size; every run sees the same samples"
    )
    norms.add_argument("--config", help="base run config YAML")
    norms.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    norms.add_argument("--fold", default="0", help="validation fold (default 0)")
    norms.add_argument(
        "--lr-scaling",
        choices=("none", "linear"),
        default="none",
        help="scale train.lr with the batch size (linear: lr x batch / smallest batch)",
    )
    norms.add_argument(
        "--seeds", default=None, help="comma-separated training seeds (default: the config's train.seed)"
    )
    norms.add_argument("--device", choices=("cpu", "cuda"), default=None)
    norms.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from medgn.config import load_run_config
    from medgn.workflows.study import norm_study

    cfg = load_run_config(args.config, args.set)
    batch_sizes = _ints(args.batch_sizes, "--batch-sizes", 1, MAX_BATCH)
    seeds = _ints(args.seeds, "--seeds", 0, 2**31 - 1) if args.seeds is not None else []
    fold = parse_fold(args.fold)
    if fold == ALL_FOLDS:
        raise UsageError("--fold", "a study compares validation Dice: it needs a validation fold", got=args.fold)
    names = [n.strip() for n in args.norms.split(",") if n.strip()]
    if not names:
        raise UsageError("--norms", "empty list", expected="e.g. batch,group")
    _distinct(names, "--norms", args.norms)
    if not 1 <= args.iterations <= MAX_ITERATIONS:
        raise UsageError("--iterations", "out of range", got=args.iterations, expected=f"1 to {MAX_ITERATIONS}")
    from medgn.layers import NORMS

    unknown = [n for n in names if n.partition(":")[0] not in NORMS]
    if unknown:
        raise UsageError("--norms", f"unknown norm {unknown[0]!r}", expected="one of " + ", ".join(sorted(NORMS)))
    samples = args.iterations * min(batch_sizes)
    lcm = math.lcm(*batch_sizes)
    if samples % lcm:  # every arm must see exactly these samples: a batch size must divide them
        step = lcm // min(batch_sizes)
        most = min(MAX_ITERATIONS, MAX_SAMPLES_PER_EPOCH // min(batch_sizes))
        near = [n for n in ((args.iterations // step) * step, (args.iterations // step + 1) * step) if 0 < n <= most]
        raise UsageError(
            "--iterations",
            f"{args.iterations} steps at batch {min(batch_sizes)} are {samples} samples, which not every batch "
            f"size ({args.batch_sizes}) divides",
            expected=f"a multiple of {step}" + (f", e.g. {' or '.join(map(str, near))}" if near else f" up to {most}"),
        )
    if samples > MAX_SAMPLES_PER_EPOCH:  # each arm is one epoch, whose sample order is a list
        raise UsageError(
            "--iterations",
            f"{samples} samples per run, more than one epoch may hold",
            expected=f"--iterations x the smallest batch size <= {MAX_SAMPLES_PER_EPOCH}",
        )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = norm_study(
        cfg,
        args.data,
        args.out,
        names,
        batch_sizes,
        samples=samples,
        fold=fold,
        device=device,
        lr_scaling=args.lr_scaling,
        seeds=seeds,
    )
    print(f"{'norm':<14} {'seed':>4} {'batch':>5} {'iters':>6} {'val Dice':>9}")
    for row in rows:
        dice = row["val_dice_mean"]
        print(
            f"{row['norm']:<14} {row['seed']:>4} {row['batch_size']:>5} {row['iterations']:>6} "
            f"{'-' if dice is None else round(dice, 4):>9}"
        )
    print(f"wrote {args.out}/study.csv, study.md and study.png")
    return 0
