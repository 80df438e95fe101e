"""One case through inference: read, preprocess, predict, invert, post-process, write, record.

This module owns :func:`run_case` and the per-case provenance sidecar. The input channels are
read once (:func:`read_inputs`: the sha256 that decides skip or refusal, and the bytes that
:func:`medgn.data.io.read_volume` then decodes with its header preflight and NaN/Inf checks; the
first channel is the geometry reference), preprocessed as the plan says
(:func:`medgn.data.prepare.prepare`, no MONAI import), predicted with
:func:`medgn.infer.sliding_window.predict_probabilities`, brought back onto exactly the input voxel
grid with :func:`medgn.data.prepare.invert_probabilities`, turned into raw label values (argmax, the
plan's ``label_values``, after the chosen post-processing of the class map) and written with
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medgn.data.datasets import CHANNEL_RE, missing_original, strip_image_suffix
from medgn.data.preflight import MASK_SUFFIXES
from medgn.errors import InputDataError, MedgnError, UsageError
from medgn.files import atomic_path, atomic_write_bytes, atomic_write_json, file_sha256, json_sha256
from medgn.infer.predictor import Predictor
from medgn.infer.sliding_window import WindowSettings, predict_probabilities

__all__ = [
    "CaseOutcome",
    "changed_outputs",
    "fingerprint",
    "mask_suffix",
    "output_state",
    "read_inputs",
    "read_sidecar",
    "recorded_outputs",
    "run_case",
]

SIDECAR_VERSION = 1
SEG_SUFFIX = ".seg.dcm"  # medgn.data.dicom_seg.SEG_SUFFIX, kept here so naming needs no pydicom
OUTPUT_FORMATS = ("nifti", "dicom-seg", "both")
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


def default_output_format(images: tuple[Path, ...]) -> str:
    """The input's family: a DICOM series gets a DICOM-SEG and a NIfTI mask, files a mask like them."""
    return "both" if images[0].is_dir() else "nifti"


def primary_suffix(images: tuple[Path, ...], output_format: str | None, suffix: str) -> str:
    """Suffix of the file whose presence marks a finished case (the SEG when it is the only output)."""
    return SEG_SUFFIX if (output_format or default_output_format(images)) == "dicom-seg" else suffix


def fingerprint(inputs: list[str], models: list[str], config_hash: str, settings: Mapping[str, Any]) -> str:
    """sha256 over what determines a case's output: input and model hashes, config, settings."""
    record = {"inputs": inputs, "models": models, "config_hash": config_hash, "settings": dict(settings)}
    return json_sha256(record, compact=False)


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """A case sidecar, or None when absent, unreadable or not shaped like one (it proves nothing)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    hashes = data.get("output_sha256", {})

    def names(key: str) -> bool:
        values = data.get(key, [])
        return isinstance(values, list) and all(
            isinstance(o, str) and o and "/" not in o and o not in (".", "..") for o in values
        )

    warnings = data.get("warnings", [])
    well_formed = (
        isinstance(data.get("fingerprint", ""), str)
        and isinstance(data.get("status", ""), str)
        and names("outputs")
        and names("previous_outputs")
        and isinstance(hashes, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in hashes.items())
        and isinstance(warnings, list)
        and all(isinstance(w, str) for w in warnings)
    )
    return data if well_formed else None


def output_state(folder: Path, sidecar: Mapping[str, Any] | None) -> tuple[str, list[str]]:
    """What became of the outputs a sidecar records, and the outputs that say so.

    ("intact", []) when every one is in ``folder`` with the sha256 it recorded (sidecars from before
    recorded none: existence only); ("changed", [those]) when one has other bytes (edited by hand,
    or damaged); ("missing", []) when one was deleted and the others are proven unchanged;
    ("unproven", [the others]) when one was deleted and another has no recorded sha256 to prove it.
    """
    if sidecar is None:
        return "missing", []
    hashes = sidecar.get("output_sha256", {})
    gone, unhashed = False, []
    for name in sidecar.get("outputs", []):
        path = folder / name
        if not path.is_file():
            gone = True
        elif name not in hashes:
            unhashed.append(name)
        elif file_sha256(path) != hashes[name]:
            return "changed", [name]
    if not gone:
        return "intact", []
    return ("unproven", unhashed) if unhashed else ("missing", [])


def changed_outputs(stem: Path, state: str, names: list[str]) -> UsageError:
    """The refusal for outputs that may no longer be what this model and these settings wrote
    (``state`` and ``names`` from :func:`output_state`)."""
    what = (
        "some outputs of an earlier run are gone and the others cannot be shown unchanged (its record has no sha256)"
        if state == "unproven"  # an older record: no sha256 says the outputs still there are unchanged
        else "outputs changed since medgn wrote them (edited by hand, or damaged)"
    )
    return UsageError(
        stem.parent,
        f"{what}: {', '.join(names)}",
        expected="--overwrite to predict them again, or another --output to keep them",
    )


def recorded_outputs(sidecar: Mapping[str, Any] | None, stem: str, mask: str) -> list[str]:
    """The outputs an earlier record lists (also while it was running), when that record is of the
    same case: it lists ``mask`` or this stem's DICOM-SEG. A record of another mask (another format,
    another input) keeps its files."""
    if sidecar is None:
        return []
    outputs = [*sidecar.get("outputs", []), *sidecar.get("previous_outputs", [])]
    return outputs if mask in outputs or stem + SEG_SUFFIX in outputs else []


def class_indices(probs: torch.Tensor) -> np.ndarray:
    """The class of every voxel of (K, X, Y, Z) scores: the first maximum, as ``argmax(dim=0)``.

    One pass per class over contiguous planes instead of torch's strided reduction over the class
    axis (about 10x slower on a CPU for the few classes of a segmentation); uint8 indices up to 256
    classes. Unlike ``argmax``, a NaN score never wins: the voxel takes its best class with a
    number (background when every score is NaN).
    """
    k = int(probs.shape[0])
    best = probs[0].clone()
    best.masked_fill_(best.isnan(), float("-inf"))
    index = torch.zeros(probs.shape[1:], dtype=torch.uint8 if k <= 256 else torch.int64)
    for c in range(1, k):
        better = probs[c] > best  # strictly greater: a tie keeps the lower class, as argmax does
        index.masked_fill_(better, c)
        torch.fmax(best, probs[c], out=best)  # fmax: a NaN score does not become the best
    return index.numpy()


def _read_channels(
    images: tuple[Path, ...], in_channels: int, limits: Any = None, reads: list[Any] | None = None
) -> list[Any]:
    from medgn.data.io import geometry_diff, read_volume
    from medgn.data.multichannel import read_case_images
    from medgn.data.preflight import DEFAULT_LIMITS

    if len(images) == 1 and in_channels > 1:
        try:
            return read_case_images(images, in_channels, limits)  # one 4D file holding every channel (MSD)
        except InputDataError as exc:
            named = CHANNEL_RE.match(strip_image_suffix(images[0].name))
            three_d = "has 1 channel(s) on its 4th axis" in exc.what or "must be a 4D NIfTI" in exc.what
            if not (named and named.group("channel") == "0000" and three_d):
                raise
            stem = named.group("case")  # a 3D case_0000 alone: the case's other channel files are missing
            raise InputDataError(
                images[0].with_name(f"{stem}_0001"),
                "channel file missing",
                got=f"only {images[0].name}",
                expected=f"{in_channels} channel files per case ({stem}_0000 ... _{in_channels - 1:04d})",
            ) from None
    if len(images) != in_channels:
        raise InputDataError(
            images[0],
            f"case has {len(images)} channel(s)",
            got=[p.name for p in images],
            expected=f"{in_channels} channel(s) as the model was trained",
        )
    volumes = [read_volume(p, limits or DEFAULT_LIMITS, read=r) for p, r in zip(images, reads or [None] * len(images))]
    for vol in volumes[1:]:
        diffs = geometry_diff(volumes[0], vol)
        if diffs:
            raise InputDataError(
                vol.path,
                "channel geometry differs from the first channel: " + "; ".join(diffs),
                expected=f"the geometry of {volumes[0].path}",
            )
    return volumes


def _write_probabilities(
    probs: np.ndarray, reference: Any, label_values: Sequence[int], out: Path, overwrite: bool
) -> Path:
    """Write (K, X, Y, Z) probabilities as float16 in ``<case>_probabilities.npz``, atomically.

    NIfTI-1 has no float16 type, so every input format gets the same compressed ``.npz`` with
    ``probabilities`` (K, X, Y, Z) in file voxel order, ``affine`` (RAS) and ``label_values``.
    """
    path = out.with_name(out.name + PROBABILITIES_SUFFIX)
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as handle:
            # float16 halves the file; its 1e-3 resolution is finer than any threshold users apply.
            np.savez_compressed(
                handle,
                probabilities=probs.astype(np.float16),
                affine=np.asarray(reference.affine, dtype=np.float64),
                label_values=np.asarray(label_values, dtype=np.int64),  # class k is label label_values[k]
            )
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
        options: ``overwrite``, ``save_probabilities``, ``threads``, ``mask_suffix`` (the mask's
            format; default: the input's own, :func:`mask_suffix`),
            ``output_format`` (nifti, dicom-seg, both; None: the input's family),
            ``limits`` (header and resampled-size limits; default :data:`DEFAULT_LIMITS`),
            ``postprocessing`` (a :class:`~medgn.infer.postprocess.PostProcessing` or None).
        preprocess: (channel paths, their volumes) -> ((C, *pipeline_shape) image, pipeline
            data for ``invert``).
        invert: ((K, *pipeline_shape) probabilities, data) -> (K, X, Y, Z) on the input grid.
        sidecar_base: provenance shared by every case (models, settings, versions...), with the
            case's ``inputs`` and ``fingerprint`` already filled in.
        reads: what :func:`read_inputs` read of each channel (decoded here, not read again).

    Raises:
        InputDataError: unreadable input, wrong channels, geometry check failed (exit 3).
        ResourceError: above a header limit, or too large once resampled (exit 5).
        UsageError: an output exists and overwrite is off (exit 2).
    """
    sidecar_path = stem.with_name(stem.name + ".json")
    previous = sidecar_path.read_bytes() if sidecar_path.is_file() else None
    running = {**sidecar_base, "status": "running"}
    if options.get("stale_outputs"):  # a resume after a kill still knows what the earlier record left
        running["previous_outputs"] = list(options["stale_outputs"])
    atomic_write_json(sidecar_path, running, overwrite=True)
    published: list[str] = []
    try:
        return _segment(
            images, stem, predictor, settings, options, preprocess, invert, sidecar_base, sidecar_path, published, reads
        )
    except BaseException:  # an error, or Ctrl-C / SIGTERM (which medgn turns into KeyboardInterrupt)
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
    from medgn.data.dicom_seg import seg_sources, write_dicom_seg
    from medgn.data.io import write_mask

    times: dict[str, float] = {}
    warnings: list[str] = []
    t0 = time.perf_counter()
    from medgn.data.preflight import DEFAULT_LIMITS
    from medgn.data.workload import check_workload

    limits = options.get("limits") or DEFAULT_LIMITS
    volumes = _read_channels(images, predictor.plan.in_channels, limits, reads)
    reference = volumes[0]
    # Before the pipeline resamples: the whole grid at the plan's spacing, and its windows.
    check_workload(
        reference.path,
        reference.shape,
        reference.affine,
        predictor.plan.target_spacing,
        limits,
        roi=settings.roi_size,
        overlap=settings.overlap,
    )
    requested = options.get("output_format")
    out_format = requested or default_output_format(images)
    sources = None
    if out_format in ("dicom-seg", "both"):
        try:  # a series that cannot carry a SEG fails here, before anything is predicted or written
            sources = seg_sources(reference)
        except InputDataError as exc:
            if requested:
                raise
            # Not asked for explicitly: anonymised series often lack the UIDs; the NIfTI mask is
            # still exact, so write it and say why there is no SEG.
            warnings.append(f"no DICOM-SEG written ({exc.one_line()})")
            out_format = "nifti"
    image, data = preprocess([os.fspath(p) for p in images], volumes)  # no second read of the files
    times["read_preprocess"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    k = predictor.plan.num_classes
    blank = all(not np.any(v.array) for v in volumes)
    if blank:
        # Every voxel 0: the region the pipeline crops to is empty, so there is nothing to segment.
        warnings.append(f"{reference.path}: image is blank (every voxel is 0): nothing to segment, the mask is empty")
        probs = torch.zeros((k, *reference.shape), dtype=torch.float32)
        probs[0] = 1.0
        times["predict"] = time.perf_counter() - t1
    else:
        probs = predict_probabilities(
            predictor.models,
            torch.as_tensor(image),
            settings,
            device=predictor.device,
            warnings=warnings,
            threads=options.get("threads"),
        )
        times["predict"] = time.perf_counter() - t1
        t_inv = time.perf_counter()
        # (K, X, Y, Z) on the input grid; only the class map is used unless the probabilities are saved
        probs = torch.as_tensor(invert(probs, data, classes_only=not options.get("save_probabilities"))).float()
        times["invert"] = time.perf_counter() - t_inv
    t2 = time.perf_counter()
    if tuple(probs.shape[1:]) != reference.shape:
        raise InputDataError(
            reference.path,
            "prediction is not on the input grid after inversion",
            got=f"shape {tuple(probs.shape[1:])}",
            expected=f"shape {reference.shape}",
        )
    label_values = np.asarray(predictor.label_values, dtype=np.int64)
    classes = class_indices(probs)  # (X, Y, Z) class indices
    if options.get("postprocessing") is not None:
        from medgn.infer.postprocess import apply as apply_postprocessing

        classes = apply_postprocessing(classes, options["postprocessing"])
    mask = label_values[classes]  # raw label values
    if not blank and not np.any(mask != label_values[0]):
        warnings.append(f"{reference.path}: the mask is empty (no voxel of any class but background)")
    overwrite = bool(options.get("overwrite"))
    outputs: list[str] = []
    if out_format != "dicom-seg":
        out_mask = stem.with_name(stem.name + (options.get("mask_suffix") or mask_suffix(images[0])))
        outputs.append(write_mask(mask, reference, out_mask, overwrite=overwrite).name)
        published.extend(outputs)
    if sources is not None:
        dataset = predictor.plan.dataset if isinstance(predictor.plan.dataset, Mapping) else {}
        labels = dataset.get("labels") if isinstance(dataset.get("labels"), Mapping) else {}
        names = {int(v): str(k) for k, v in labels.items() if isinstance(v, int)}
        try:
            seg_path = write_dicom_seg(
                mask,
                reference,
                sources,
                predictor.label_values,
                names,
                stem.with_name(stem.name + SEG_SUFFIX),
                overwrite=overwrite,
            )
        except InputDataError as exc:
            if requested:
                raise
            warnings.append(f"no DICOM-SEG written ({exc.one_line()})")  # the NIfTI mask is exact
        else:
            outputs.append(seg_path.name)
            published.append(outputs[-1])
    if options.get("save_probabilities"):
        outputs.append(_write_probabilities(probs.numpy(), reference, predictor.label_values, stem, overwrite).name)
    times["postprocess_write"] = time.perf_counter() - t2
    times["total"] = time.perf_counter() - t0
    own = (stem.name + SEG_SUFFIX, stem.name + PROBABILITIES_SUFFIX)  # only these: never a user's file
    mask_name = stem.name + str(options.get("mask_suffix", ""))
    recorded_sha = options.get("stale_sha256") or {}
    for stale in options.get("stale_outputs") or ():  # an earlier record's outputs this run did not rewrite
        path = stem.parent / stale
        # This case's mask, when a SEG alone replaces it, only as the earlier record wrote it (a mask
        # corrected by hand since stays): left there, `medgn evaluate` would score the old mask.
        ours = stale == mask_name and path.is_file() and recorded_sha.get(stale) == file_sha256(path)
        if stale not in outputs and (stale in own or ours):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    sidecar = dict(sidecar_base)
    sidecar.update(
        {
            "status": "done",
            "outputs": outputs,
            "output_sha256": {name: file_sha256(stem.parent / name) for name in outputs},
            "mask": outputs[0],
            "seconds": {k: round(v, 4) for k, v in times.items()},
            "warnings": warnings,
            "labels_found": sorted(
                {int(label_values[c]) for c in np.flatnonzero(np.bincount(classes.ravel(), minlength=k))}
            ),
        }
    )
    atomic_write_json(sidecar_path, sidecar, overwrite=True)
    return CaseOutcome(outputs + [stem.name + ".json"], warnings)


def read_inputs(images: tuple[Path, ...], channels: int | None = None) -> tuple[list[Any], list[dict[str, str]]]:
    """Read every channel's file once: what was read (decoded later, only when the case runs) and
    each channel's path and sha256, which decide whether the case is done or its outputs are ours.

    Raises:
        InputDataError: an input cannot be read, a channel file is missing, or the case has more
            channel files than ``channels`` (the model's) (exit 3).
    """
    from medgn.data.detached import with_data_files_sha256
    from medgn.data.io import input_bytes

    needed = images[:channels] if channels else images
    for path in needed:
        original = missing_original(path)
        if original is not None:  # a channel file the case lacks (its place kept by find_inputs)
            raise InputDataError(original, "channel file missing", expected="a file for every channel of the case")
    extra = [p for p in images[len(needed) :] if missing_original(p) is None]
    if extra:  # c_0003 beside c_0000, c_0001 for a 2-channel model: not a gap at c_0002
        raise InputDataError(
            extra[0],
            f"case has channel files the model does not take: {', '.join(p.name for p in extra)}",
            expected=f"{channels} channel file(s) per case, as the model was trained",
        )
    images = (*needed, *extra)  # places kept beyond the model's channels are not read
    reads = [input_bytes(p) for p in images]
    return reads, [{"path": os.fspath(p), "sha256": with_data_files_sha256(p, r.sha256)} for p, r in zip(images, reads)]


def outputs_exist(stem: Path, suffix: str) -> list[Path]:
    """Existing files at the paths this case's outputs are written to (mask, sidecar, probabilities)."""
    candidates = [stem.with_name(stem.name + s) for s in (suffix, SEG_SUFFIX, ".json", PROBABILITIES_SUFFIX)]
    return [p for p in candidates if p.exists()]


def refuse_existing(
    stem: Path, existing: list[Path], sidecar: dict[str, Any] | None = None, mask: str = ""
) -> UsageError:
    """The per-case error for outputs left by another model, settings or input.

    A provenance file that describes a mask of the same name in another format (``ct_seg.nrrd``
    when ``ct_seg.mha`` is asked for) is named as such: the two would share ``ct_seg.json``.
    """
    names = ", ".join(p.name for p in existing)
    recorded = (sidecar or {}).get("outputs") if isinstance(sidecar, dict) else None
    others = [o for o in recorded if isinstance(o, str)] if isinstance(recorded, list) else []
    same_stem = [o for o in others if o != mask and o.startswith(stem.name + ".") and not o.endswith(".json")]
    if mask and same_stem and mask not in others:
        return UsageError(
            stem.parent,
            f"{stem.name}.json records the mask {same_stem[0]}, and {mask} would share it (one provenance file "
            "per mask name)",
            expected=f"another name for this mask, or --overwrite to replace {same_stem[0]}'s record",
        )
    if sidecar is None:  # no readable record: nothing says whose they are
        return UsageError(
            stem.parent,
            f"outputs exist without a readable provenance file ({stem.name}.json): {names}",
            expected="pass --overwrite to redo them, or another --output",
        )
    return UsageError(
        stem.parent,
        f"outputs exist from a different model, settings or input: {names}",
        expected="pass --overwrite to redo them, or another --output",
    )
