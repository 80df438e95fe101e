"""Per-case measurements for the dataset fingerprint, taken from volumes already in memory.

This module owns :class:`CaseStats` and :func:`case_statistics`: the voxel spacing and shape in the
pipeline's array axes (after reorientation to RAS), a sample of foreground intensities per channel
(foreground = label > 0) and the voxel count of each label value. Verification computes them while
it holds a case's volumes, so ``medgn train`` reads every file once for both the check and the
fingerprint; :mod:`medgn.planning.fingerprint` aggregates them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medgn.data.io import Volume

# Foreground voxels sampled per case and channel: nnU-Net's 10,000 gives percentiles stable to
# well under 1 % of the intensity range while keeping memory flat for large datasets.
SAMPLES_PER_CASE = 10_000


@dataclass
class CaseStats:
    """One case's fingerprint entry (JSON-able) and its sampled foreground intensities per channel."""

    entry: dict[str, Any]
    samples: list[np.ndarray]


def ras_axes(affine: np.ndarray) -> np.ndarray:
    """For each RAS world axis, the array axis that runs along it (after Orientation("RAS"))."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(
        np.asarray(affine, dtype=np.float64)
    )  # (3, 2): world axis, flip per array axis
    order = np.empty(3, dtype=int)
    order[ornt[:, 0].astype(int)] = np.arange(3)
    return order


def ras_spacing_shape(vol: Volume) -> tuple[list[float], list[int]]:
    """Spacing and shape of ``vol`` in the pipeline's axes (array reoriented to RAS)."""
    order = ras_axes(vol.affine)
    return [float(vol.spacing[a]) for a in order], [int(vol.shape[a]) for a in order]


def case_statistics(
    case_id: str, images: Sequence[Volume], label: Volume | None, rng: np.random.Generator
) -> CaseStats:
    """Measure one case from its channel volumes and label.

    Args:
        case_id: recorded in the entry.
        images: the channels, first one the geometry reference.
        label: the label map, or None (then every voxel counts as foreground).
        rng: the sampling generator; one draw per case, cases in dataset order, so the result is
            the same whether the volumes came from verification or from a separate read.
    """
    spacing, shape = ras_spacing_shape(images[0])
    mask = label.array > 0 if label is not None else np.ones(images[0].shape, bool)
    where = np.flatnonzero(mask)
    pick = rng.choice(where, size=min(SAMPLES_PER_CASE, where.size), replace=False) if where.size else where
    samples = [img.array.ravel()[pick] for img in images]
    values, counts = np.unique(label.array, return_counts=True) if label is not None else (np.zeros(0), np.zeros(0))
    voxel_mm3 = float(np.prod(images[0].spacing))
    entry = {
        "case_id": case_id,
        "spacing": spacing,
        "shape": shape,
        "label_voxels": {str(int(v)): int(c) for v, c in zip(values, counts)},
        "voxel_mm3": voxel_mm3,
        "foreground_fraction": float(where.size / mask.size),
    }
    return CaseStats(entry, samples)
