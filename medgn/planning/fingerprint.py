"""Dataset fingerprint: spacings, shapes, foreground intensity statistics and label volumes.

This module owns :func:`compute_fingerprint`, the measurement step before planning (as in
nnU-Net), and :func:`aggregate_fingerprint`, which sums up per-case statistics
(:mod:`medgn.data.case_stats`) that verification may already have taken: for every training case
the voxel spacing and shape in the pipeline's array axes (after reorientation to RAS), sampled
foreground intensities per channel (foreground = label > 0) and the voxels of each label value. Everything is plain
JSON-able numbers, stored in the
plan so the plan can be re-derived and audited.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from medgn.data.case_stats import (
    SAMPLES_PER_CASE,
    CaseStats,
    case_statistics,
    ras_axes,
    ras_spacing_shape,
)
from medgn.data.datasets import Case, DatasetIndex, refuse_unsupported_labels
from medgn.data.io import read_volume
from medgn.data.multichannel import read_case_images
from medgn.data.preflight import DEFAULT_LIMITS, Limits
from medgn.data.verify import channel_geometry_problem, label_coverage, label_geometry_problem
from medgn.errors import InputDataError

__all__ = [
    "SAMPLES_PER_CASE",
    "aggregate_fingerprint",
    "compute_fingerprint",
    "intensity_stats",
    "ras_axes",
    "ras_spacing_shape",
]


def intensity_stats(samples: np.ndarray) -> dict[str, float]:
    """Mean, std, median, min, max and 0.5/99.5 percentiles of sampled intensities."""
    if samples.size == 0:
        return {"mean": 0.0, "std": 1.0, "median": 0.0, "min": 0.0, "max": 0.0, "p00_5": 0.0, "p99_5": 0.0, "count": 0}
    samples = samples.astype(np.float64)
    lo, hi = np.percentile(samples, [0.5, 99.5])  # nnU-Net's CT clipping percentiles
    return {
        "mean": float(samples.mean()),
        "std": float(samples.std()),
        "median": float(np.median(samples)),
        "min": float(samples.min()),
        "max": float(samples.max()),
        "p00_5": float(lo),
        "p99_5": float(hi),
        "count": int(samples.size),
    }


def _read_case(case: Case, index: DatasetIndex, limits: Limits, rng: np.random.Generator) -> CaseStats:
    label_values = sorted(index.labels.values()) if index.labels else None
    images = read_case_images(case.images, len(index.channel_names), limits)
    label = read_volume(case.label, limits, label=True, label_values=label_values) if case.label else None
    # The statistics sample every volume at the label's voxel positions: they must share one grid
    # (the same rule and words as verify's).
    first = images[0]
    for channel, vol in enumerate(images[1:], start=1):
        if (problem := channel_geometry_problem(first, vol, channel)) is not None:
            raise InputDataError(vol.path, problem)
    if label is not None and (problem := label_geometry_problem(first, label)) is not None:
        raise InputDataError(label.path, problem)
    return case_statistics(case.case_id, images, label, rng)


def compute_fingerprint(
    index: DatasetIndex,
    limits: Limits = DEFAULT_LIMITS,
    *,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure a dataset for planning.

    Args:
        index: the dataset (training cases need labels).
        limits: size limits for reading.
        seed: seed of the foreground-voxel sampling (fixed: the plan is reproducible).
        progress: called with each case id after it is read.

    Returns:
        JSON-able dict with per-case spacing/shape (RAS axes), per-channel foreground intensity
        statistics, label values found and mean label volumes in mm^3.

    Raises:
        InputDataError: region-based labels, or no foreground in any training label (exit 3); the
            classes declared but found in no label are left to the caller
            (:func:`medgn.data.verify.label_coverage`).
    """
    refuse_unsupported_labels(index)
    rng = np.random.default_rng(seed)
    stats = []
    for case in index.cases:
        stats.append(_read_case(case, index, limits, rng))
        if progress is not None:
            progress(case.case_id)
    fingerprint = aggregate_fingerprint(index, stats)
    if index.cases and all(case.label is not None for case in index.cases):
        problems, _ = label_coverage(index, fingerprint["label_values_found"])
        if problems:  # the intensity statistics sample the foreground: with none, they are meaningless
            raise InputDataError("", problems[0])  # the problem names dataset.json (or labels/)
    return fingerprint


def aggregate_fingerprint(index: DatasetIndex, stats: Sequence[CaseStats]) -> dict[str, Any]:
    """The fingerprint from per-case statistics (from :func:`compute_fingerprint`'s own reads, or
    from :func:`medgn.data.verify.verify_dataset` with ``stats_seed``, which reads each file once
    for both)."""
    cases, per_channel = (
        [s.entry for s in stats],
        [[s.samples[c] for s in stats] for c in range(len(index.channel_names))],
    )
    spacings = np.asarray([c["spacing"] for c in cases], dtype=np.float64).reshape(-1, 3)
    shapes = np.asarray([c["shape"] for c in cases], dtype=np.float64).reshape(-1, 3)
    found = sorted({int(v) for c in cases for v in c["label_voxels"]})
    volumes = {
        str(v): float(np.mean([c["label_voxels"].get(str(v), 0) * c["voxel_mm3"] for c in cases])) for v in found
    }
    channels = []
    for c, name in enumerate(index.channel_names):
        channel_stats = intensity_stats(np.concatenate(per_channel[c]) if per_channel[c] else np.zeros(0))
        channels.append({"name": name, "modality": index.modalities[c], **channel_stats})
    return {
        "num_cases": len(cases),
        "median_spacing": np.median(spacings, axis=0).tolist() if len(cases) else [],
        "median_shape": np.median(shapes, axis=0).tolist() if len(cases) else [],
        "channels": channels,
        "label_values_found": found,
        "label_volume_mm3_mean": volumes,
        "cases": cases,
    }
