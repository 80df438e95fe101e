"""``medgn export``: write a trained model as ONNX or TorchScript; a thin wrapper over :mod:`medgn.export`."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="export a trained model to ONNX or TorchScript")
    parser.add_argument(
        "--model",
        required=True,
        metavar="RUN_DIR_OR_CHECKPOINT",
        help="run folder (its best checkpoint, else final, else latest) or checkpoint",
    )
    parser.add_argument(
        "--format",
        choices=("onnx", "torchscript"),
        default=None,
        help="onnx (onnxruntime, standard ops, opset 18) or torchscript (default: from --out's name)",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="file to write: .onnx, or .pt/.pth/.ts for TorchScript; never replaced without --overwrite",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing regular file (never a FIFO or device)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medgn.export import export_model

    exported = export_model(args.model, args.out, fmt=args.format, overwrite=args.overwrite)
    stride = exported.metadata["medgn_stride"].replace(",", ", ")
    print(
        f"exported {exported.fmt} model -> {exported.path} (input 'image' (B, C, D, H, W) preprocessed as its "
        f"metadata 'medgn_preprocessing' says, D/H/W multiples of ({stride}); output 'logits')"
    )
    return 0
