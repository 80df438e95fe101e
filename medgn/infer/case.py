"""One case through inference: read, preprocess, predict, invert, post-process, write, record.

This module owns :func:`run_case` and the per-case provenance sidecar. The input channels are
read once (:func:`read_inputs`: the sha256 that decides skip or refusal, and the bytes that
:func:`medgn.data.io.read_volume` then decodes with its header preflight and NaN/Inf checks; the
first channel is the geometry reference), preprocessed with the plan's MONAI pipeline, predicted with
:func:`medgn.infer.sliding_window.predict_probabilities`, brought back onto exactly the input voxel
grid with :func:`medgn.data.pipeline.invert_to_input`, turned into raw label values (argmax, the
plan's ``label_values``, optionally the largest connected component per class) and written with
:func:`medgn.data.io.write_mask`, which checks the geometry before publishing. The sidecar
``<case>.json`` is written twice: with ``status: running`` before any output (so a rerun knows
outputs left by an interrupted run of the same fingerprint are its own) and with ``status: done``
last, so a done sidecar whose fingerprint matches proves the case is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medgn.data.preflight import MASK_SUFFIXES
from medgn.errors import InputDataError, MedgnError, UsageError
from medgn.files import atomic_path, atomic_write_bytes, atomic_write_json, json_sha256
from medgn.infer.predictor import Predictor
from medgn.infer.sliding_window import WindowSettings, predict_probabilities

__all__ = ["CaseOutcome", "fingerprint", "mask_suffix", "read_inputs", "read_sidecar", "run_case"]

SIDECAR_VERSION = 1
# The probabilities file every input format gets (NIfTI-1 has no float16; see _write_probabilities).
PROBABILITIES_SUFFIX = "_probabilities.npz"


@dataclass
class CaseOutcome:
    """Files written for one case and what the user should know about it."""

    outputs: list[str]
    warnings: list[str]


def mask_suffix(first_channel: Path) -> str:
    """The mask's file suffix: the input's own format (``.nii``/``.nii.gz``/``.nrrd``/``.mha``)."""
    name = first_channel.name.lower()
    if first_channel.is_dir():
        return ".nii.gz"
    for suffix in (*MASK_SUFFIXES, ".mhd"):
        if name.endswith(suffix):
            return ".mha" if suffix == ".mhd" else suffix
    return ".nii.gz"


def fingerprint(inputs: list[str], models: list[str], config_hash: str, settings: Mapping[str, Any]) -> str:
    """sha256 over what determines a case's output: input and model hashes, config, settings."""
    record = {"inputs": inputs, "models": models, "config_hash": config_hash, "settings": dict(settings)}
    return json_sha256(record, compact=False)


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """A case sidecar, or None when absent or unreadable (an unreadable one proves nothing)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def largest_component_per_class(mask: np.ndarray, background: int = 0) -> np.ndarray:
    """Keep, for every label value except ``background``, only its largest 26-connected component."""
    from scipy import ndimage

    out = mask.copy()
    structure = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity: diagonal neighbours touch
    for value in np.unique(mask):
        if value == background:
            continue
        components, n = ndimage.label(mask == value, structure=structure)
        if n <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        out[(components != int(np.argmax(sizes))) & (components > 0)] = background
    return out


def _read_channels(images: tuple[Path, ...], in_channels: int, reads: list[Any] | None = None) -> list[Any]:
    from medgn.data.io import geometry_diff, read_volume

    if len(images) != in_channels:
        raise InputDataError(images[0], f"case has {len(images)} channel(s)", got=[p.name for p in images], expected=f"{in_channels} channel(s) as the model was trained")
    volumes = [read_volume(p, read=r) for p, r in zip(images, reads or [None] * len(images))]
    for vol in volumes[1:]:
        diffs = geometry_diff(volumes[0], vol)
        if diffs:
            raise InputDataError(vol.path, "channel geometry differs from the first channel: " + "; ".join(diffs), expected=f"the geometry of {volumes[0].path}")
    return volumes


def _write_probabilities(probs: np.ndarray, reference: Any, out: Path, overwrite: bool) -> Path:
    """Write (K, X, Y, Z) probabilities as float16 in ``<case>_probabilities.npz``, atomically.

    NIfTI-1 has no float16 type, so every input format gets the same compressed ``.npz`` with
    ``probabilities`` (K, X, Y, Z) in file voxel order, ``affine`` (RAS) and ``label_values``.
    """
    path = out.with_name(out.name + PROBABILITIES_SUFFIX)
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as handle:
            # float16 halves the file; its 1e-3 resolution is finer than any threshold users apply.
            np.savez_compressed(handle, probabilities=probs.astype(np.float16), affine=np.asarray(reference.affine, dtype=np.float64))
    return path


def run_case(
    images: tuple[Path, ...],
    stem: Path,
    predictor: Predictor,
    settings: WindowSettings,
    options: Mapping[str, Any],
    preprocess: Callable[[list[str], list[Any]], tuple[torch.Tensor, Any]],
    invert: Callable[[torch.Tensor, Any], torch.Tensor],
    sidecar_base: Mapping[str, Any],
    reads: list[Any] | None = None,
) -> CaseOutcome:
    """Segment one case and write its mask, optional probabilities and sidecar.

    Args:
        images: channel files (or a DICOM folder) of the case, channel order.
        stem: output path without suffix (``<output_dir>/<safe name>``).
        predictor: the loaded models and plan.
        settings: sliding-window settings.
        options: ``overwrite``, ``save_probabilities``, ``largest_component``, ``threads``.
        preprocess: (channel paths, their volumes) -> ((C, *pipeline_shape) image, pipeline
            data for ``invert``).
        invert: ((K, *pipeline_shape) probabilities, data) -> (K, X, Y, Z) on the input grid.
        sidecar_base: provenance shared by every case (models, settings, versions...), with the
            case's ``inputs`` and ``fingerprint`` already filled in.
        reads: what :func:`read_inputs` read of each channel (decoded here, not read again).

    Raises:
        InputDataError: unreadable input, wrong channels, geometry check failed (exit 3).
        UsageError: an output exists and overwrite is off (exit 2).
    """
    sidecar_path = stem.with_name(stem.name + ".json")
    previous = sidecar_path.read_bytes() if sidecar_path.is_file() else None
    atomic_write_json(sidecar_path, {**sidecar_base, "status": "running"}, overwrite=True)
    published: list[str] = []
    try:
        return _segment(images, stem, predictor, settings, options, preprocess, invert, sidecar_base, sidecar_path, published, reads)
    except Exception:
        # A case that failed before publishing anything leaves what was there before; once an
        # output is published (or after a kill) "running" stays, so a rerun redoes the case.
        if not published:
            with contextlib.suppress(OSError, MedgnError):
                if previous is None:
                    sidecar_path.unlink(missing_ok=True)
                else:
                    atomic_write_bytes(sidecar_path, previous)
        raise


def _segment(
    images: tuple[Path, ...],
    stem: Path,
    predictor: Predictor,
    settings: WindowSettings,
    options: Mapping[str, Any],
    preprocess: Callable[[list[str], list[Any]], tuple[torch.Tensor, Any]],
    invert: Callable[[torch.Tensor, Any], torch.Tensor],
    sidecar_base: Mapping[str, Any],
    sidecar_path: Path,
    published: list[str],
    reads: list[Any] | None,
) -> CaseOutcome:
    from medgn.data.io import write_mask

    times: dict[str, float] = {}
    warnings: list[str] = []
    t0 = time.perf_counter()
    volumes = _read_channels(images, predictor.plan.in_channels, reads)
    reference = volumes[0]
    image, data = preprocess([os.fspath(p) for p in images], volumes)  # no second read of the files
    times["read_preprocess"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    probs = predict_probabilities(predictor.models, torch.as_tensor(image), settings, device=predictor.device, warnings=warnings, threads=options.get("threads"))
    times["predict"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    probs = torch.as_tensor(invert(probs, data)).float()  # (K, X, Y, Z) on the input grid
    if tuple(probs.shape[1:]) != reference.shape:
        raise InputDataError(reference.path, "prediction is not on the input grid after inversion", got=f"shape {tuple(probs.shape[1:])}", expected=f"shape {reference.shape}")
    label_values = np.asarray(predictor.label_values, dtype=np.int64)
    mask = label_values[probs.argmax(dim=0).numpy()]  # (X, Y, Z) raw label values
    if options.get("largest_component"):
        mask = largest_component_per_class(mask, background=int(label_values[0]))
    overwrite = bool(options.get("overwrite"))
    out_mask = stem.with_name(stem.name + mask_suffix(images[0]))
    outputs = [write_mask(mask, reference, out_mask, overwrite=overwrite).name]
    published.extend(outputs)
    if options.get("save_probabilities"):
        outputs.append(_write_probabilities(probs.numpy(), reference, stem, overwrite).name)
    times["postprocess_write"] = time.perf_counter() - t2
    times["total"] = time.perf_counter() - t0

    sidecar = dict(sidecar_base)
    sidecar.update({"status": "done", "outputs": outputs, "mask": outputs[0], "seconds": {k: round(v, 4) for k, v in times.items()}, "warnings": warnings, "labels_found": sorted(int(v) for v in np.unique(mask))})
    atomic_write_json(sidecar_path, sidecar, overwrite=True)
    return CaseOutcome(outputs + [stem.name + ".json"], warnings)


def read_inputs(images: tuple[Path, ...]) -> tuple[list[Any], list[dict[str, str]]]:
    """Read every channel's file once: what was read (decoded later, only when the case runs) and
    each channel's path and sha256, which decide whether the case is done or its outputs are ours.

    Raises:
        InputDataError: an input cannot be read (exit 3).
    """
    from medgn.data.io import input_bytes

    reads = [input_bytes(p) for p in images]
    return reads, [{"path": os.fspath(p), "sha256": r.sha256} for p, r in zip(images, reads)]


def outputs_exist(stem: Path, images: tuple[Path, ...]) -> list[Path]:
    """Existing files at the paths this case's outputs are written to (mask, sidecar, probabilities)."""
    candidates = [stem.with_name(stem.name + s) for s in (mask_suffix(images[0]), ".json", PROBABILITIES_SUFFIX)]
    return [p for p in candidates if p.exists()]


def refuse_existing(stem: Path, existing: list[Path]) -> UsageError:
    """The per-case error for outputs left by another model, settings or input."""
    names = ", ".join(p.name for p in existing)
    return UsageError(stem.parent, f"outputs exist from a different model, settings or input: {names}", expected="pass --overwrite to redo them, or another --output")
