"""``medgn evaluate``: compare predicted label maps with references and write the reports.

A thin wrapper over :func:`medgn.evaluate.run.evaluate`: parses the folders, labels, regions and
tolerance, prints the per-class summary table, lists failed and missing cases and the labels it could
not score on stderr, and exits 3 when any case failed (missing predictions are an error unless
``--allow-missing``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medgn.errors import UsageError, printable


def _labels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"labels must be comma-separated integers, got {text!r}") from None


def _region(text: str) -> tuple[str, tuple[int, ...]]:
    name, sep, members = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"a region is NAME=L1,L2,..., got {text!r}")
    return name.strip(), _labels(members)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="Dice, IoU, HD95, ASSD and surface Dice of predictions against references",
        description="Compare a folder of predicted label maps with a folder of reference label maps "
        "(matched by file name), or one prediction file with one reference file, and write metrics.csv, "
        "summary.json, report.md, boxplot.png and overlays/.",
    )
    parser.add_argument(
        "--pred",
        required=True,
        type=Path,
        metavar="DIR_OR_FILE",
        help="folder of predicted label maps, or one prediction file (with --ref one reference file)",
    )
    parser.add_argument(
        "--ref",
        required=True,
        type=Path,
        metavar="DIR_OR_FILE",
        help="folder of reference label maps, or one reference file",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (created if needed)")
    parser.add_argument(
        "--labels",
        type=_labels,
        metavar="1,2,...",
        help="labels to evaluate (default: every nonzero value found). A label absent from both maps of a case "
        "scores Dice 1 there; one in no reference and no prediction of any case is not scored (NaN, 'absent') "
        "and left out of the means",
    )
    parser.add_argument(
        "--region",
        type=_region,
        action="append",
        default=[],
        metavar="NAME=1,2,...",
        help="also evaluate the union of these labels as one structure (repeatable)",
    )
    parser.add_argument(
        "--dataset",
        type=Path,
        metavar="DIR",
        help="dataset folder whose dataset.json declares the labels (a case with another value fails) and "
        "regions (nnU-Net labels with lists) to evaluate too",
    )
    parser.add_argument(
        "--nsd-tolerance-mm", type=float, default=2.0, metavar="MM", help="surface Dice tolerance in mm (default 2)"
    )
    parser.add_argument(
        "--allow-missing", action="store_true", help="count a missing prediction as failed (Dice 0) instead of stopping"
    )
    parser.add_argument(
        "--images", type=Path, metavar="DIR_OR_FILE", help="images under the overlay contours (a folder, or one file)"
    )
    parser.add_argument(
        "--worst-k", type=int, default=3, metavar="K", help="overlays for the K worst cases per label (default 3)"
    )
    parser.add_argument(
        "--only-predicted",
        action="store_true",
        help="score only the reference cases that have a prediction (e.g. a test subset against every label)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace earlier results in --out")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medgn.evaluate.report import format_table
    from medgn.evaluate.run import evaluate

    regions: dict[str, tuple[int, ...]] = {}
    declared_labels = None
    label_names: dict[int, str] = {}
    if args.dataset is not None:
        from medgn.data.datasets import load_dataset

        index = load_dataset(args.dataset, training=False)
        declared = index.regions  # {"regions": {name: [labels]}, "order": [...]}
        regions.update({name: tuple(members) for name, members in declared.get("regions", {}).items()})
        # The values a label map may hold: the plain labels and every member of a region (an
        # nnU-Net region dataset lists its labels only inside regions).
        values = {int(v) for v in index.labels.values()} | {int(m) for ms in regions.values() for m in ms}
        declared_labels = sorted(values) if values - {0} else None
        label_names = {int(v): str(name) for name, v in index.labels.items()}
    for name, members in args.region:
        if name in regions:
            raise UsageError("--region", f"region {name!r} given twice", got=[n for n, _ in args.region])
        regions[name] = members
    result = evaluate(
        args.pred,
        args.ref,
        args.out,
        labels=args.labels,
        nsd_tolerance_mm=args.nsd_tolerance_mm,
        allow_missing=args.allow_missing,
        image_dir=args.images,
        regions=regions,
        worst_k=args.worst_k,
        overwrite=args.overwrite,
        only_predicted=args.only_predicted,
        declared_labels=declared_labels,
        label_names=label_names,
    )
    print(format_table(result))
    counts = result.summary["counts"]
    print(
        f"cases {counts['cases']}: evaluated {counts['evaluated']}, missing {counts['missing']}, failed "
        f"{counts['failed']}; "
        f"results in {args.out}"
    )
    if not result.labels and not result.regions and counts["evaluated"]:
        print("medgn: warning: no foreground label in any prediction or reference: nothing to score", file=sys.stderr)
    for key in result.absent:
        print(
            f"medgn: warning: {'label' if key.isdigit() else 'region'} {printable(key)}: in no reference and no "
            "prediction of any evaluated case, not scored (NaN) and left out of the means",
            file=sys.stderr,
        )
    for cid in result.missing:
        print(f"medgn: warning: {printable(cid)}: prediction missing, counted as Dice 0", file=sys.stderr)
    for cid, why in result.failures.items():
        print(f"medgn: error: case {printable(cid)}: {printable(why)}", file=sys.stderr)
    return result.exit_code
