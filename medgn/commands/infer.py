"""``medgn infer``: segment scans with trained models; a thin wrapper over :func:`medgn.infer.run.infer`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from medgn.commands import limits_from_args
from medgn.data.preflight import DEFAULT_LIMITS
from medgn.errors import UsageError, printable
from medgn.infer.config import distinct_spatial_axes

WEIGHTS_VAR = "MEDGN_WEIGHTS"  # the model when --model is not given: the Docker images' baked weights


def _axes(text: str) -> tuple[int, ...]:
    try:
        axes = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        axes = ()
    if not axes or not distinct_spatial_axes(axes):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of distinct axes from 0, 1, 2 (e.g. 0,1)")
    return axes


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("infer", help="segment a scan or a folder of scans with trained models")
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="RUN_DIR_OR_CHECKPOINT",
        help=f"run folder or checkpoint; repeat to average folds (default: ${WEIGHTS_VAR}, which the Docker "
        "images set to their baked weights)",
    )
    parser.add_argument(
        "--input",
        required=True,
        metavar="PATH",
        help="image file, folder, dataset folder (test list) or DICOM series folder",
    )
    parser.add_argument(
        "--output",
        required=True,
        metavar="DIR_OR_FILE",
        help="output folder (created; never inside the input), or for a single scan the mask's file name "
        "(.nii.gz, .nii, .nrrd or .mha: written in that format, its .json record beside it)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mirroring test-time augmentation over every subset of the mirror axes (8 flips for 3 axes); "
        "default: what the model was trained to use (its config's infer.tta)",
    )
    parser.add_argument(
        "--mirror-axes",
        type=_axes,
        default=None,
        metavar="A,B",
        help="mirror over these spatial axes, e.g. 0,1 (4 flips; turns mirroring on unless --no-tta); "
        "default: the model's infer.mirror_axes",
    )
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1) (default: 0.5)")
    parser.add_argument("--sw-batch-size", type=int, default=2, help="windows per forward pass (default: 2)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for inference on the CPU")
    parser.add_argument("--save-probabilities", action="store_true", help="also write float16 class probabilities")
    parser.add_argument(
        "--largest-component",
        action="store_true",
        help="keep the largest connected component of every class (same as --postprocess lcc)",
    )
    parser.add_argument(
        "--postprocess",
        choices=("auto", "none", "lcc"),
        default="auto",
        help="auto: what the model chose from its held-out cases when it was trained (postprocessing.json); "
        "none; lcc: largest component of every class",
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="auto: bf16 autocast where the device computes bf16 natively (GPUs, CPUs with AVX512-BF16/AMX), else fp32",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="redo cases whose outputs came from other models, settings or inputs"
    )
    parser.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="process every N-th case from I (0-based); default from RANK/WORLD_SIZE",
    )
    parser.add_argument(
        "--channels",
        default=None,
        metavar="A,B",
        help="channel names: <case>_A, <case>_B files form the channels in this order",
    )
    parser.add_argument(
        "--output-format",
        choices=("nifti", "dicom-seg", "both"),
        default=None,
        help="mask format: nifti, dicom-seg (DICOM Segmentation referencing the source series) or both "
        "(default: both for a DICOM series, nifti otherwise)",
    )
    parser.add_argument(
        "--max-voxels",
        type=int,
        default=DEFAULT_LIMITS.max_voxels,
        help="largest scan accepted, from its header (voxels per channel)",
    )
    parser.add_argument("--max-dim", type=int, default=DEFAULT_LIMITS.max_dim, help="largest size of one axis (voxels)")
    parser.add_argument(
        "--max-resampled-voxels",
        type=int,
        default=DEFAULT_LIMITS.max_resampled_voxels,
        help="largest scan accepted once resampled to the model's spacing (voxels)",
    )
    parser.add_argument(
        "--max-windows",
        type=int,
        default=DEFAULT_LIMITS.max_windows,
        help="most sliding windows over one resampled scan",
    )
    parser.add_argument("--no-progress", action="store_true", help="no live progress display")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medgn.infer.run import InferSettings, infer
    from medgn.logs import attach_file_log, current_log_path, fallback_log_path

    if current_log_path() is None:  # per-case tracebacks of a batch run go to the user's log file
        try:
            attach_file_log(fallback_log_path())
        except OSError:
            pass
    if not args.model:
        baked = os.environ.get(WEIGHTS_VAR, "")
        if not baked:
            raise UsageError(
                "--model", "no model given", expected=f"--model RUN_DIR_OR_CHECKPOINT (or {WEIGHTS_VAR} set to one)"
            )
        from medgn.errors import ModelError
        from medgn.infer.predictor import resolve_model_path

        try:
            resolve_model_path(baked)
        except ModelError as exc:  # e.g. an image built without baked weights: the folder holds none
            raise UsageError(
                "--model",
                f"no model given, and ${WEIGHTS_VAR} ({baked}) holds none: {exc.what}",
                expected="--model RUN_DIR_OR_CHECKPOINT (mount the run folder)",
            ) from None
        args.model = [baked]
    if args.threads is not None and not 1 <= args.threads <= 1024:
        raise UsageError("--threads", "value out of range", got=args.threads, expected="1 <= threads <= 1024")
    channels = None
    if args.channels is not None:
        channels = [c.strip() for c in args.channels.split(",")]
        if not all(channels) or len(set(channels)) != len(channels):
            raise UsageError(
                "--channels",
                "channel names must be distinct and not empty",
                got=args.channels,
                expected="names separated by commas, e.g. T1,T2",
            )
    limits = limits_from_args(args)
    settings = InferSettings.of(
        device=args.device,
        tta=args.tta,
        mirror_axes=args.mirror_axes,
        overlap=args.overlap,
        save_probabilities=args.save_probabilities,
        largest_component=args.largest_component,
        postprocess=args.postprocess,
        precision=args.precision,
        overwrite=args.overwrite,
        shard=args.shard,
        channels=channels,
        sw_batch_size=args.sw_batch_size,
        threads=args.threads,
        output_format=args.output_format,
        progress=not args.no_progress and sys.stderr.isatty(),
        limits=limits,
    )
    report = infer(args.model, args.input, args.output, settings)
    counts = report.to_dict()["counts"]
    where = printable(str(report.mask_file or report.output_dir))  # one line, whatever the name holds
    models = ""
    if len(report.models) > 1:  # say which runs were averaged: a folder of runs takes every run in it
        files = [Path(m["path"]) for m in report.models]
        runs = [f.parent.parent.name if f.parent.name == "checkpoints" else f.name for f in files]
        models = f" (ensemble of {len(runs)} models: {printable(', '.join(runs))})"
    print(f"{counts['ok']} segmented, {counts['skipped']} skipped, {counts['failed']} failed -> {where}{models}")
    for case in report.cases:  # also in each sidecar; here so that nobody has to open them to learn it
        for warning in case.warnings:
            sys.stderr.write(f"medgn: warning: case {printable(case.case_id)}: {printable(warning)}\n")
    for case in report.failed:
        sys.stderr.write(f"medgn: error: case {printable(case.case_id)}: {printable(case.message)}\n")
    return report.exit_code
