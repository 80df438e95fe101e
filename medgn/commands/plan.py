"""``medgn plan DATASET --out plan.json``: fingerprint a dataset and write its plan and folds."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from medgn.commands import limits_from_args
from medgn.data.datasets import load_dataset
from medgn.data.preflight import DEFAULT_LIMITS
from medgn.data.workload import VALIDATION_OVERLAP, check_workload
from medgn.errors import UsageError
from medgn.files import is_inside
from medgn.planning.fingerprint import compute_fingerprint
from medgn.planning.planner import DEFAULT_GPU_GB, make_plan
from medgn.planning.splits import load_or_create_splits


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
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds and of intensity sampling")
    parser.add_argument(
        "--max-voxels", type=int, default=DEFAULT_LIMITS.max_voxels, help="largest volume accepted (voxels per channel)"
    )
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


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    dataset = Path(os.path.normpath(Path(args.dataset).absolute()))
    if not 0.5 <= args.gpu_memory <= 4096:  # GB: below 0.5 no 3D U-Net trains; above 4 TB is a typo
        raise UsageError("--gpu-memory", "out of range", got=args.gpu_memory, expected="0.5..4096 GB")
    if not out.parent.absolute().is_dir():
        raise UsageError(out, "output folder does not exist", expected="an existing folder")
    if is_inside(out, dataset):
        raise UsageError(
            out, "refusing to write into the dataset folder", expected="an output path outside the input tree"
        )
    if out.exists() and not args.overwrite:
        raise UsageError(out, "output exists", expected="a new path, or pass --overwrite")
    index = load_dataset(dataset)
    limits = limits_from_args(args)
    print(f"{index.name}: fingerprinting {len(index.cases)} cases")
    fingerprint = compute_fingerprint(index, limits, seed=args.seed)
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
    plan.save(out, overwrite=args.overwrite)
    splits = (
        load_or_create_splits(
            out.with_name("splits.json"), [c.case_id for c in index.cases], min(args.folds, len(index.cases)), args.seed
        )
        if len(index.cases) >= 2
        else []
    )
    norms = ", ".join(n["scheme"] for n in plan.normalization)
    print(
        f"target spacing {list(plan.target_spacing)} mm, normalisation {norms}, patch "
        f"{list(plan.patch_size)}, batch {plan.batch_size}, {len(plan.network.strides or ())} stages, "
        f"{len(splits)} folds"
    )
    print(f"wrote {out}")
    return 0
