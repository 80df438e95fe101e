"""Bounding boxes of masks, with numpy only (the evaluation package imports no torch).

This module owns :func:`nonzero_box`, the one rule for the box around a mask's true voxels that
inference preprocessing (the crop to the image's nonzero region), the largest-component filter and
the surface metrics share.
"""

from __future__ import annotations

import numpy as np

__all__ = ["nonzero_box"]


def nonzero_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding every true voxel of ``mask``; None when there is none."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)
