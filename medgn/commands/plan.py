"""``medgn plan DATASET --out plan.json``: fingerprint a dataset and write its plan and folds."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from medgn.commands import limits_from_args
from medgn.data.datasets import load_dataset
from medgn.data.preflight import DEFAULT_LIMITS
from medgn.data.verify import label_coverage
from medgn.data.workload import VALIDATION_OVERLAP, check_workload
from medgn.errors import UsageError
from medgn.files import RunLock, is_inside, make_output_dir, missing_folders
from medgn.logs import warn_user
from medgn.planning.fingerprint import compute_fingerprint
from medgn.planning.plan_config import PlanConfig
from medgn.planning.planner import DEFAULT_GPU_GB, make_plan
from medgn.planning.splits import SPLITS_FILE, load_or_create_splits


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan", help="measure a dataset and choose spacing, normalisation, patch and network"
    )
    parser.add_argument("dataset", help="dataset folder (MSD, nnU-Net v2 raw, or images/ + labels/)")
    parser.add_argument("--out", required=True, help="plan JSON to write (splits.json is written next to it)")
    parser.add_argument(
        "--gpu-memory",
        type=float,
        default=DEFAULT_GPU_GB,
        help=f"training GPU memory budget in GB (default {DEFAULT_GPU_GB:g})",
    )
    parser.add_argument(
        "--folds",
        type=int,
        default=None,
        help="cross-validation folds (default 5); a splits.json already next to --out is kept (its folds "
        "and seed), and --folds must agree with it",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds and of intensity sampling")
    parser.add_argument(
        "--max-voxels", type=int, default=DEFAULT_LIMITS.max_voxels, help="largest volume accepted (voxels per channel)"
    )
    parser.add_argument("--max-dim", type=int, default=DEFAULT_LIMITS.max_dim, help="largest size of one axis (voxels)")
    parser.add_argument(
        "--max-resampled-voxels",
        type=int,
        default=DEFAULT_LIMITS.max_resampled_voxels,
        help="largest volume once resampled to the planned spacing (voxels)",
    )
    parser.add_argument(
        "--max-windows",
        type=int,
        default=DEFAULT_LIMITS.max_windows,
        help="most sliding windows of the planned patch over one resampled volume",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing plan")
    parser.set_defaults(func=run)


def _existing_splits(path: Path, case_ids: list[str], folds: int | None) -> list[dict[str, list[str]]] | None:
    """The folds a splits.json next to the plan already holds (checked against the dataset), or None.

    Raises:
        InputDataError: the file is unreadable or splits other cases (another dataset's folder).
        UsageError: ``--folds`` asks for another number of folds than the file holds.
    """
    if not path.exists():
        return None
    splits = load_or_create_splits(path, case_ids, other_dataset=ANOTHER_OUT)
    if folds is not None and len(splits) != min(folds, len(case_ids)):
        raise UsageError(
            "--folds",
            f"{path} already holds {len(splits)} folds",
            got=folds,
            expected=f"--folds {len(splits)} (or none), or delete {path.name} to re-split",
        )
    return splits


# What a splits.json of other cases next to --out means for 'medgn plan'.
ANOTHER_OUT = (
    "a plan of another dataset goes into its own folder (another --out); "
    "delete this file only if it is this dataset's and stale"
)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    dataset = Path(os.path.normpath(Path(args.dataset).absolute()))
    if not 0.5 <= args.gpu_memory <= 4096:  # GB: below 0.5 no 3D U-Net trains; above 4 TB is a typo
        raise UsageError("--gpu-memory", "out of range", got=args.gpu_memory, expected="0.5..4096 GB")
    # The folder is created just before the plan is written; its nearest existing parent must be a folder.
    missing = missing_folders(out.parent)
    ancestor = missing[-1].parent if missing else out.parent.absolute()
    if not ancestor.is_dir():
        raise UsageError(out, "output folder cannot be created: a parent is not a folder", got=str(ancestor))
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(out, "output folder cannot be created: a parent is not writable", got=str(ancestor))
    if is_inside(out, dataset):
        raise UsageError(
            out, "refusing to write into the dataset folder", expected="an output path outside the input tree"
        )
    if out.is_dir() or args.out.endswith(("/", os.sep)):  # Path() drops the slash of "newrun/"
        raise UsageError(args.out, "output path is a folder", expected="a plan file name, e.g. runs/la2018_plan.json")
    if out.exists() and not args.overwrite:
        raise UsageError(out, "output exists", expected="a new path, or pass --overwrite")
    if args.folds is not None and args.folds < 2:
        raise UsageError("--folds", "cross-validation needs at least 2 folds", got=args.folds, expected=">= 2")
    if args.seed < 0:  # numpy's generators take non-negative seeds (as plan.split_seed)
        raise UsageError("--seed", "seed must not be negative", got=args.seed, expected="an integer >= 0")
    index = load_dataset(dataset)
    # The folds are checked before minutes of fingerprinting, and before anything is written.
    existing = _existing_splits(out.with_name(SPLITS_FILE), [c.case_id for c in index.cases], args.folds)
    limits = limits_from_args(args)
    print(f"{index.name}: fingerprinting {len(index.cases)} cases")
    fingerprint = compute_fingerprint(index, limits, seed=args.seed)
    for warning in label_coverage(index, fingerprint["label_values_found"])[1]:
        warn_user(warning)
    plan = make_plan(index, fingerprint, gpu_memory_gb=args.gpu_memory)
    for case, entry in zip(index.cases, fingerprint["cases"]):  # spacing and shape in RAS axes
        # The windows of the planned patch at the validator's overlap: what training will predict.
        check_workload(
            case.images[0],
            entry["shape"],
            np.diag([*entry["spacing"], 1.0]),
            plan.target_spacing,
            limits,
            roi=plan.patch_size,
            overlap=VALIDATION_OVERLAP,
        )
    make_output_dir(out.parent)  # a missing folder (runs/ of a fresh clone) is created, after every check
    with RunLock(out.parent, purpose="plan"):  # one plan at a time writes a folder's plan and splits.json
        if out.exists() and not args.overwrite:  # a plan that finished while this one fingerprinted
            raise UsageError(out, "output exists", expected="a new path, or pass --overwrite")
        existing = _existing_splits(out.with_name(SPLITS_FILE), [c.case_id for c in index.cases], args.folds)
        plan.save(out, overwrite=args.overwrite)
        if existing is not None:
            splits = existing
        elif len(index.cases) >= 2:
            asked = args.folds or PlanConfig().n_folds
            folds = min(asked, len(index.cases))
            if folds < asked:
                warn_user(
                    f"{asked} folds asked ({'--folds' if args.folds else 'the default'}) but the dataset has "
                    f"{len(index.cases)} cases: {folds} folds, one case each held out"
                )
            splits = load_or_create_splits(
                out.with_name(SPLITS_FILE),
                [c.case_id for c in index.cases],
                folds,
                args.seed,
                other_dataset=ANOTHER_OUT,
            )
        else:
            splits = []
    norms = ", ".join(n["scheme"] for n in plan.normalization)
    print(
        f"target spacing {list(plan.target_spacing)} mm, normalisation {norms}, patch "
        f"{list(plan.patch_size)}, batch {plan.batch_size}, {len(plan.network.strides or ())} stages, "
        f"{len(splits)} folds"
    )
    print(f"wrote {out}")
    return 0
