"""Export a trained network to ONNX or TorchScript for deployment without medgn.

This module owns :func:`export_model` (a run folder or checkpoint -> one file) and
:func:`export_module` (an ``nn.Module`` -> one file). The network is exported in eval mode on the
CPU with medgn's GroupNorm on its ``torch`` backend, which is ``F.group_norm`` plus the residual and
activation as plain ops: the ONNX exporter writes GroupNorm as Reshape + InstanceNormalization +
Reshape + Mul + Add (standard ops onnxruntime runs at every opset), never medgn's Triton custom op.
Spatial sizes are dynamic (any multiple of the network's total stride; batch too). TorchScript is
traced. Either way the model is serialised in memory, run once from those bytes and matched
against PyTorch, and only then written, atomically. An operator the exporter does not support, an
existing file without ``overwrite``, an existing path that is not a regular file, or a folder that
cannot be written is a one-line error before anything is written (the last three before the model is
loaded); a full disk is a resource error naming the file, with nothing left at its path.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import io
import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from medgn.data.prepare import PIPELINE_VERSION
from medgn.errors import ModelError, ResourceError, UsageError
from medgn.files import atomic_write_bytes, is_inside, make_output_dir, path_problem

__all__ = [
    "FORMATS",
    "METADATA_KEYS",
    "OPSET",
    "Exported",
    "exported_metadata",
    "export_model",
    "export_module",
    "format_for",
]

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".pth", ".ts")}
# What a deployment needs besides the graph, stored in the file by export_model: the plan's
# preprocessing as JSON (spacing, normalisation, label values, channels, patch), the total stride
# every spatial size must be a multiple of ("16,16,8"), and the medgn version that wrote it.
METADATA_KEYS = ("medgn_preprocessing", "medgn_stride", "medgn_version")
# What medgn.data.prepare does before the network, in order: an exported model's users redo it.
PREPROCESSING_STEPS = (
    "crop to the box of voxels nonzero in any channel",
    "normalise each channel by its 'normalization' entry: zscore = (x - mean) / std over the case's nonzero "
    "voxels of that channel; ct = clip to 'clip', then (x - mean) / std with the plan's values; none = as it is",
    "reorient to RAS (array axes toward the patient's right, anterior, superior)",
    "resample trilinearly to target_spacing (mm, in RAS axis order)",
    "the network takes (B, C, D, H, W), D, H, W along R, A, S, each a multiple of medgn_stride (medgn infer "
    "slides windows of patch_size and blends them with Gaussian weights)",
)
# Opset 18: InstanceNormalization, Resize and ConvTranspose as onnxruntime >= 1.14 runs them; the
# GroupNorm decomposition needs nothing newer (GroupNormalization-21 is not required).
OPSET = 18
# The check run at export time: float32 ONNX vs PyTorch differ by reassociated sums in
# convolutions and normalisation (~1e-6 relative per layer); 1e-3 absolute on logits of order 1-10
# catches a wrong graph (errors of order 1) without flagging rounding.
CHECK_ATOL = 1e-3


class _Logits(nn.Module):
    """The network's full-resolution logits only (deep-supervision outputs dropped)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out[0] if isinstance(out, (list, tuple)) else out


@contextlib.contextmanager
def _torch_backend(model: nn.Module) -> Iterator[None]:
    """Run every medgn GroupNorm on the plain-PyTorch backend while exporting."""
    saved = [(m, m.backend) for m in model.modules() if hasattr(m, "backend") and isinstance(m.backend, str)]
    for m, _ in saved:
        m.backend = "torch"
    try:
        yield
    finally:
        for m, backend in saved:
            m.backend = backend


def _total_stride(model: nn.Module) -> tuple[int, ...]:
    """The network's total stride per axis (every spatial size must be a multiple); 1 when it has none."""
    stride = getattr(model, "total_stride", (1, 1, 1))
    return tuple(int(t) for t in (stride() if callable(stride) else stride))


def _example(model: nn.Module, in_channels: int, size: Sequence[int] | None) -> torch.Tensor:
    stride = _total_stride(model)
    # Two strides per axis (at least 16 voxels): every level of the network is at least 2 wide.
    shape = tuple(size) if size else tuple(max(16, 2 * int(s)) for s in stride)
    return torch.randn(1, in_channels, *shape, generator=torch.Generator().manual_seed(0))


def _unsupported(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _check_out(out: Path, overwrite: bool) -> None:
    """Check the destination before any work: a file name in an existing folder that can be written.

    An existing path is replaced only when it is a regular file and ``overwrite`` is set: a FIFO,
    socket or device node (``/dev/full``) never is.

    Raises:
        UsageError: any of these fails (exit 2), naming ``out``.
        ResourceError: the folder's file system is full (exit 5).
    """
    if out.is_dir():
        raise UsageError(out, "output path is a folder", expected="a file name such as model.onnx")
    if os.path.lexists(out) and not out.is_file():
        raise UsageError(
            out,
            f"output path exists and is {path_problem(out)}; only a regular file is replaced",
            expected="another --out",
        )
    if not out.parent.is_dir():
        what = "is a file" if os.path.lexists(out.parent) else "does not exist"
        raise UsageError(out, f"output folder {what}", expected="a file in an existing folder")
    if out.exists() and not overwrite:
        raise UsageError(out, "output file exists", expected="another --out, or --overwrite")
    try:  # the folder exists: this only probes that a file can be written in it
        make_output_dir(out.parent)
    except ResourceError:
        raise ResourceError(out, "no space left on device", expected="free disk space") from None
    except UsageError as exc:
        raise UsageError(out, exc.what, expected="a file in a folder where files can be written") from None


def _write(out: Path, data: bytes, overwrite: bool) -> None:
    """Write the exported bytes to ``out`` atomically; a failed write leaves nothing at ``out``.

    Raises:
        ResourceError: the disk is full or over quota (the atomic writer says so), or the file is too
            large for it (exit 5).
        UsageError: ``out`` cannot be written otherwise (read-only file system, permissions; exit 2).
    """
    _check_out(out, overwrite)  # again: the path or its folder may have changed while exporting
    try:
        atomic_write_bytes(out, data, overwrite=overwrite)
    except OSError as exc:
        if exc.errno == errno.EFBIG:
            raise ResourceError(out, f"cannot write the exported model ({exc.strerror or exc})") from exc
        raise UsageError(
            out, f"cannot write the exported model ({exc.strerror or exc})", expected="a writable --out"
        ) from exc


def _contiguous(model: nn.Module) -> nn.Module:
    """``model`` computing in the default layout: exporters record one graph, with no memory formats.

    A model that runs channels_last_3d (an inference default on CPUs with native bf16) is copied
    and switched back; the numbers are the same.
    """
    if getattr(model, "memory_format", "contiguous") == "contiguous":
        return model
    model = copy.deepcopy(model)
    model.memory_format = "contiguous"
    return model.to(memory_format=torch.contiguous_format)


def export_module(
    model: nn.Module,
    in_channels: int,
    out: str | os.PathLike[str],
    *,
    fmt: str = "onnx",
    overwrite: bool = False,
    example_size: Sequence[int] | None = None,
    where: str | os.PathLike[str] = "model",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Export ``model`` (B, C, D, H, W) -> logits (B, K, D, H, W) to ``out``.

    Args:
        model: the network (moved to the CPU, eval mode).
        in_channels: C.
        out: destination file; its folder must exist.
        fmt: "onnx" or "torchscript".
        overwrite: replace an existing file.
        example_size: spatial size of the tracing example (default: twice the total stride, >= 16).
        where: named in error messages (the checkpoint).
        metadata: key -> text stored in the file (ONNX ``metadata_props``; TorchScript extra
            files ``<key>.txt``); :func:`exported_metadata` reads them back.

    Returns:
        The written file.

    Raises:
        UsageError: unknown format; ``out`` exists without ``overwrite``, exists and is not a regular
            file, or is in a folder that is missing or cannot be written (exit 2).
        ModelError: the exporter cannot express an operator, or the exported model does not run
            or disagrees with PyTorch (exit 4); nothing is written.
        ResourceError: out of memory while exporting, or the disk is full (exit 5); nothing is
            left at ``out``.
    """
    if fmt not in FORMATS:
        raise UsageError("--format", "unknown export format", got=fmt, expected=" or ".join(FORMATS))
    out = Path(out)
    _check_out(out, overwrite)
    wrapped = _Logits(_contiguous(model.cpu().eval())).eval()
    x = _example(model, in_channels, example_size)
    with _torch_backend(wrapped), torch.no_grad():
        reference = wrapped(x)
        data = _serialise(wrapped, x, fmt, metadata or {}, where)
        try:
            got = _run(data, fmt, x.numpy())
        except Exception as exc:  # noqa: BLE001 - onnxruntime and torch.jit raise their own types
            raise ModelError(
                where, f"exported {fmt} model does not run, nothing written ({_unsupported(exc)})"
            ) from exc
    err = float(np.max(np.abs(got - reference.numpy())))
    if not math.isfinite(err) or err > CHECK_ATOL:
        raise ModelError(
            where,
            f"exported {fmt} model disagrees with PyTorch, nothing written",
            got=f"max |difference| {err:.3g}",
            expected=f"<= {CHECK_ATOL}",
        )
    _write(out, data, overwrite)
    return out


def _serialise(
    model: nn.Module, x: torch.Tensor, fmt: str, metadata: Mapping[str, str], where: str | os.PathLike[str]
) -> bytes:
    """The exported file's bytes, made in memory (nothing touches the disk)."""
    try:
        # Tracer warnings about shape checks baked in, and the graph dumps some exporters print
        # when they fail: the one-line error says what failed.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            if fmt == "onnx":
                return _export_onnx(model, x, metadata)
            buffer = io.BytesIO()
            extra = {f"{key}.txt": value for key, value in metadata.items()}
            torch.jit.save(torch.jit.trace(model, x, check_trace=False), buffer, _extra_files=extra)
            return buffer.getvalue()
    except MemoryError as exc:
        raise ResourceError(where, f"out of memory while exporting to {fmt}", expected="more free memory") from exc
    except OSError as exc:  # not an operator the exporter lacks: the system refused something
        raise ResourceError(where, f"cannot export to {fmt} ({exc.strerror or exc})") from exc
    except Exception as exc:  # noqa: BLE001 - the exporters raise many types for unsupported ops
        raise ModelError(
            where,
            f"cannot export to {fmt}: unsupported operator or construct ({_unsupported(exc)})",
            expected="a network of standard PyTorch ops",
        ) from exc


def _export_onnx(model: nn.Module, x: torch.Tensor, metadata: Mapping[str, str]) -> bytes:
    axes = {0: "batch", 2: "depth", 3: "height", 4: "width"}
    buffer = io.BytesIO()
    torch.onnx.export(
        model, (x,), buffer, dynamo=False, opset_version=OPSET, input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": axes, "logits": axes}, do_constant_folding=True,
    )  # fmt: skip
    if not metadata:
        return buffer.getvalue()
    import onnx

    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    return proto.SerializeToString()


def exported_metadata(path: str | os.PathLike[str], fmt: str) -> dict[str, str]:
    """The metadata :func:`export_model` stored in an exported file (see :data:`METADATA_KEYS`)."""
    if fmt == "onnx":
        import onnx

        proto = onnx.load(str(path), format="protobuf", load_external_data=False)
        return {p.key: p.value for p in proto.metadata_props}
    extra = {f"{key}.txt": "" for key in METADATA_KEYS}
    torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return {  # torch hands extra files back as bytes
        name.removesuffix(".txt"): value.decode("utf-8") if isinstance(value, bytes) else value
        for name, value in extra.items()
        if value
    }


def format_for(out: str | os.PathLike[str], fmt: str | None) -> str:
    """The export format: ``fmt``, else the one the file name says (.onnx; .pt, .pth, .ts).

    Raises:
        UsageError: the name says another format than ``fmt``, or none and ``fmt`` is None.
    """
    lower = Path(out).name.lower()
    named = next((f for f, suffixes in SUFFIXES.items() if lower.endswith(suffixes)), None)
    if fmt is None and named is None:
        raise UsageError(
            out,
            "cannot tell the export format from the file name",
            expected="a name ending in .onnx, or .pt/.pth/.ts for TorchScript, or --format",
        )
    if fmt is not None and named is not None and named != fmt:
        raise UsageError(
            out,
            f"the file name says {named}, but --format is {fmt}",
            expected=f"a name ending in {' or '.join(SUFFIXES[fmt])} for {fmt}",
        )
    return fmt or str(named)


def run_exported(path: str | os.PathLike[str], fmt: str, x: np.ndarray, *, threads: int | None = None) -> np.ndarray:
    """Run an exported file on ``x`` (B, C, D, H, W) float32 and return its logits."""
    return _run(os.fspath(path), fmt, x, threads=threads)


def _run(source: str | bytes, fmt: str, x: np.ndarray, *, threads: int | None = None) -> np.ndarray:
    """Run an exported model, a file's path or its bytes, on ``x``; see :func:`run_exported`."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        return np.asarray(session.run(None, {"image": x})[0])
    module = torch.jit.load(io.BytesIO(source) if isinstance(source, bytes) else source, map_location="cpu")
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


class Exported(NamedTuple):
    """What :func:`export_model` wrote: the file, its format and the metadata stored in it."""

    path: Path
    fmt: str
    metadata: dict[str, str]


def export_model(
    model_path: str | os.PathLike[str], out: str | os.PathLike[str], *, fmt: str | None = None, overwrite: bool = False
) -> Exported:
    """Export a run's model (best checkpoint, else final, else latest) to ONNX or TorchScript.

    The format is ``fmt``, else the one ``out``'s name says (:func:`format_for`). The file also
    holds the plan's preprocessing, the network's total stride and medgn's version
    (:data:`METADATA_KEYS`, read back with :func:`exported_metadata`).

    Returns:
        The written file, its format and the metadata stored in it.

    Raises:
        UsageError: unknown format, a name that says another format, or an ``out`` that
            :func:`export_module` refuses (exit 2); checked before the model is loaded.
        ModelError: the checkpoint cannot be loaded or exported (exit 4).
        ResourceError: out of memory, or the disk is full (exit 5).
    """
    import medgn
    from medgn.infer.predictor import load_predictor

    if fmt is not None and fmt not in FORMATS:
        raise UsageError("--format", "unknown export format", got=fmt, expected=" or ".join(FORMATS))
    fmt = format_for(out, fmt)
    _check_out(Path(out), overwrite)  # before the model is loaded
    predictor = load_predictor(model_path, "cpu")
    if len(predictor.models) > 1:
        raise UsageError(
            model_path,
            f"an export holds one network; this is an ensemble of {len(predictor.models)}",
            expected="one of its run folders (e.g. " + str(predictor.run_dirs()[0]) + ")",
        )
    source = Path(predictor.sources[0].path)  # a file beside it could be a checkpoint of the run, or a pointer
    same = Path(out).resolve() == source.resolve()
    if same or (source.parent.name == "checkpoints" and is_inside(out, source.parent)):
        raise UsageError(
            out,
            "would replace the model's own checkpoint" if same else "is inside the model's checkpoints folder",
            got=f"the model {source}",
            expected="an --out outside the run's checkpoints folder",
        )
    plan = predictor.plan.to_dict()
    keep = ("dataset", "in_channels", "num_classes", "label_values", "target_spacing", "normalization", "patch_size")
    preprocessing = {k: plan[k] for k in keep if k in plan}
    preprocessing["steps"] = list(PREPROCESSING_STEPS)
    preprocessing["pipeline_version"] = PIPELINE_VERSION
    metadata = {
        "medgn_preprocessing": json.dumps(preprocessing, sort_keys=True),
        "medgn_stride": ",".join(map(str, _total_stride(predictor.models[0]))),
        "medgn_version": medgn.__version__,
    }
    path = export_module(
        predictor.models[0],
        predictor.plan.in_channels,
        out,
        fmt=fmt,
        overwrite=overwrite,
        where=predictor.sources[0].path,
        metadata=metadata,
    )
    return Exported(path, fmt, metadata)
