"""``medgn verify DATASET``: check every case of a dataset and list every problem with its file."""

from __future__ import annotations

import argparse
import sys

from medgn.commands import limits_from_args
from medgn.data.datasets import load_dataset
from medgn.data.preflight import DEFAULT_LIMITS
from medgn.data.verify import verify_dataset
from medgn.errors import InputDataError, UsageError
from medgn.logs import warn_user, warnings_given


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("verify", help="check a dataset's files, headers, labels and geometry")
    parser.add_argument("dataset", help="dataset folder (MSD, nnU-Net v2 raw, or images/ + labels/)")
    parser.add_argument(
        "--max-voxels", type=int, default=DEFAULT_LIMITS.max_voxels, help="largest volume accepted (voxels per channel)"
    )
    parser.add_argument("--max-dim", type=int, default=DEFAULT_LIMITS.max_dim, help="largest size of one axis (voxels)")
    parser.add_argument(
        "--max-resampled-voxels",
        type=int,
        default=DEFAULT_LIMITS.max_resampled_voxels,
        help="largest volume once resampled to the plan's spacing (checked with --plan)",
    )
    parser.add_argument(
        "--plan", default=None, help="plan JSON from 'medgn plan': also check each image's size at the plan's spacing"
    )
    parser.add_argument("--test", action="store_true", help="also check the test images")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    limits = limits_from_args(args)
    plan = None
    if args.plan is not None:
        from medgn.planning.plan import Plan

        plan = Plan.load(args.plan)
    warned_before = warnings_given()
    index = load_dataset(args.dataset)
    if plan is not None and plan.in_channels != len(index.channel_names):  # as 'medgn train' refuses it
        raise UsageError(
            args.plan,
            f"the plan is for {plan.in_channels} input channel(s), the dataset has "
            f"{len(index.channel_names)} ({', '.join(index.channel_names)})",
            expected="a plan made from this dataset (medgn plan)",
        )
    target_spacing = plan.target_spacing if plan is not None else None
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    report = verify_dataset(index, limits, include_test=args.test, target_spacing=target_spacing, warn=None)
    tested = f", {len(report.cases) - len(index.cases)} test" if args.test else ""
    table = Table(  # names and ids are shown as written: "[red]" in a name is text, not markup
        title=escape(
            f"{index.name} ({index.format}, {len(index.cases)} training{tested} cases, "
            f"channels {', '.join(index.channel_names)})"
        )
    )
    table.add_column("case", overflow="fold")  # a long id wraps whole instead of losing its middle
    for column in ("shape", "spacing (mm)", "labels", "status"):
        table.add_column(column)
    for result in report.cases:
        status = "ok" if result.ok else f"{len(result.problems)} problem(s)"
        if result.notes:
            status += f", {len(result.notes)} note(s)"
        table.add_row(
            escape(result.case_id),
            str(result.shape or "-"),
            str(result.spacing or "-"),
            str(result.labels_found or "-"),
            status,
        )
    Console(file=sys.stdout, width=120).print(table)
    for result in report.cases:
        for note in result.notes:
            print(f"note: {note}", file=sys.stderr)
    for warning in report.warnings:
        warn_user(warning)
    problems = report.problems
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    if problems:
        bad = sum(not r.ok for r in report.cases)
        whole = f", {len(report.dataset_problems)} of the dataset as a whole" if report.dataset_problems else ""
        raise InputDataError(
            index.root,
            f"{len(problems)} problem(s) in {bad} of {len(report.cases)} cases{whole} (listed above)",
            expected="every case readable, finite, with declared labels and matching geometry, "
            "and some foreground to learn",
        )
    count = warnings_given() - warned_before
    warned = f" ({count} warning(s) above)" if count else ""
    print(f"{index.name}: all {len(report.cases)} cases passed{warned}")
    return 0
