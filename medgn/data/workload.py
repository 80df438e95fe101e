"""The work an image implies once resampled: checked against limits before any resampling.

A small header can demand enormous work: a 20^3 scan with 50 mm voxels resampled to 1.875 mm
becomes 533^3 = 151 M voxels. The header limits (:class:`~medgn.data.preflight.Limits`
``max_voxels``) see 8000 voxels; this module sees what the file becomes. It owns
:func:`resampled_shape` (the grid after reorientation to RAS and resampling to the target spacing,
in the pipeline's axes), :func:`count_windows` (sliding windows over that grid, as MONAI places
them), :func:`check_workload` (code 5 naming the file, its spacing, the size it would become and
the flag that raises the limit), :func:`check_dataset_workload` (every case of a dataset, from the
headers alone); :class:`medgn.data.pipeline.CheckWorkloadd` runs the same check inside the MONAI
pipeline right before ``Spacingd``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from medgn.data.preflight import DEFAULT_LIMITS, Limits
from medgn.errors import ResourceError

__all__ = [
    "VALIDATION_OVERLAP",
    "check_dataset_workload",
    "check_workload",
    "count_windows",
    "resampled_shape",
]

# Relative tolerance before rounding a resampled size up: float spacings like 1.5 / 0.5 give
# 2.9999999 or 3.0000001; neither should add a voxel.
_ROUND_TOL = 1e-6
# Sliding-window overlap of training's validation (medgn.train.validation): plan and train count its windows.
VALIDATION_OVERLAP = 0.25


def _ras_order(affine: np.ndarray) -> np.ndarray:
    """For each RAS world axis, the array axis that runs along it."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    order = np.empty(3, dtype=int)
    order[ornt[:, 0].astype(int)] = np.arange(3)
    return order


def resampled_shape(shape: Sequence[int], affine: np.ndarray, target_spacing: Sequence[float]) -> tuple[int, int, int]:
    """The grid an image of ``shape`` and ``affine`` becomes in the pipeline (RAS axes, target spacing).

    Args:
        shape: (X, Y, Z) in file voxel order.
        affine: 4x4 voxel -> world (RAS) of the file.
        target_spacing: the plan's spacing along the RAS axes, mm.

    Returns:
        The resampled shape along R, A, S (each >= 1).
    """
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    order = _ras_order(affine)
    extent = [float(shape[a]) * float(spacing[a]) for a in order]  # mm along R, A, S
    sizes = (max(1, math.ceil(e / float(t) * (1 - _ROUND_TOL))) for e, t in zip(extent, target_spacing))
    return tuple(sizes)  # type: ignore[return-value]


def count_windows(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """Sliding windows MONAI places over ``shape`` (padded up to ``roi``) with ``overlap``."""
    total = 1
    for size, r in zip(shape, roi):
        size, r = max(int(size), int(r)), int(r)
        step = max(int(r * (1 - overlap)), 1) if size > r else r
        total *= math.ceil((size - r) / step) + 1
    return total


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def check_workload(
    path: str | os.PathLike[str],
    shape: Sequence[int],
    affine: np.ndarray,
    target_spacing: Sequence[float],
    limits: Limits = DEFAULT_LIMITS,
    *,
    roi: Sequence[int] | None = None,
    overlap: float = 0.5,
) -> tuple[int, int, int]:
    """Refuse an image whose resampled grid (or sliding windows over it) exceeds the limits.

    Args:
        path: the file, named in the error.
        shape: (X, Y, Z) of the image (or of its cropped region) in file voxel order.
        affine: its voxel -> world (RAS) affine.
        target_spacing: the plan's spacing (RAS axes), mm.
        limits: ``max_resampled_voxels`` and ``max_windows``.
        roi: the sliding window (patch) size; windows are counted only when given.
        overlap: the sliding-window overlap.

    Returns:
        The resampled shape.

    Raises:
        ResourceError: above ``max_resampled_voxels`` or ``max_windows`` (exit 5), with the
            spacing, the resampled size and the flag that raises the limit.
    """
    new = resampled_shape(shape, affine, target_spacing)
    voxels = math.prod(new)
    spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    source = f"shape {tuple(int(s) for s in shape)} at spacing {_fmt(spacing)} mm"
    if voxels > limits.max_resampled_voxels:
        raise ResourceError(
            path,
            "image would be too large once resampled to the target spacing",
            got=f"{source} -> {new} = {voxels} voxels at {_fmt(target_spacing)} mm",
            expected=f"<= {limits.max_resampled_voxels} voxels (raise it with --max-resampled-voxels)",
        )
    if roi is not None:
        windows = count_windows(new, roi, overlap)
        if windows > limits.max_windows:
            raise ResourceError(
                path,
                "image needs too many sliding windows once resampled",
                got=f"{source} -> {new} at {_fmt(target_spacing)} mm = {windows} windows of "
                f"{tuple(int(r) for r in roi)}",
                expected=f"<= {limits.max_windows} windows (raise it with --max-windows)",
            )
    return new


def check_dataset_workload(
    cases: Sequence[Any],
    target_spacing: Sequence[float],
    limits: Limits = DEFAULT_LIMITS,
    *,
    roi: Sequence[int] | None = None,
    overlap: float = 0.5,
) -> None:
    """Check the first channel of every case (from its header alone) against the resampled limits.

    Args:
        cases: objects with ``images`` (channel paths).
        target_spacing: the plan's spacing.
        limits: ``max_resampled_voxels`` and ``max_windows``.
        roi: the patch size when the cases are predicted with sliding windows (validation).
        overlap: the sliding-window overlap used then.

    Raises:
        ResourceError: the first case above a limit (exit 5).
    """
    from medgn.data.multichannel import file_channel_count
    from medgn.data.preflight import read_header

    for case in cases:
        first = case.images[0]
        # One 4D MSD file per case holds every channel: its grid is the first three axes.
        channels = file_channel_count(first) if len(case.images) == 1 else 1
        info = read_header(first, limits, channels=channels)
        check_workload(info.path, info.shape, info.affine, target_spacing, limits, roi=roi, overlap=overlap)
