"""``medgn infer``: segment scans with trained models; a thin wrapper over :func:`medgn.infer.run.infer`."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("infer", help="segment a scan or a folder of scans with trained models")
    parser.add_argument("--model", action="append", required=True, metavar="RUN_DIR_OR_CHECKPOINT", help="run folder or checkpoint; repeat to average folds")
    parser.add_argument("--input", required=True, metavar="PATH", help="image file, folder, dataset folder (test list) or DICOM series folder")
    parser.add_argument("--output", required=True, metavar="DIR", help="output folder (created; never inside the input)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (8 flips)")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1) (default: 0.5)")
    parser.add_argument("--sw-batch-size", type=int, default=2, help="windows per forward pass (default: 2)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for inference on the CPU")
    parser.add_argument("--save-probabilities", action="store_true", help="also write float16 class probabilities")
    parser.add_argument("--largest-component", action="store_true", help="keep the largest connected component per class")
    parser.add_argument("--overwrite", action="store_true", help="redo cases whose outputs came from other models, settings or inputs")
    parser.add_argument("--shard", default=None, metavar="I/N", help="process every N-th case from I (0-based); default from RANK/WORLD_SIZE")
    parser.add_argument("--channels", default=None, metavar="A,B", help="channel names: <case>_A, <case>_B files form the channels in this order")
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
    channels = [c.strip() for c in args.channels.split(",") if c.strip()] if args.channels else None
    settings = InferSettings.of(
        device=args.device,
        tta=args.tta,
        overlap=args.overlap,
        save_probabilities=args.save_probabilities,
        largest_component=args.largest_component,
        overwrite=args.overwrite,
        shard=args.shard,
        channels=channels,
        sw_batch_size=args.sw_batch_size,
        threads=args.threads,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    report = infer(args.model, args.input, args.output, settings)
    counts = report.to_dict()["counts"]
    print(f"{counts['ok']} segmented, {counts['skipped']} skipped, {counts['failed']} failed -> {report.output_dir}")
    for case in report.failed:
        sys.stderr.write(f"medgn: error: case {case.case_id}: {case.message}\n")
    return report.exit_code
