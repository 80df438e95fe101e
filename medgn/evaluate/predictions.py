"""Predictions as label volumes on their reference's grid, for scoring and for figures.

This module owns :func:`read_prediction`: a mask file must have the reference's geometry (checked
from both headers before any voxel is read, the message naming both affines); a DICOM-SEG is read
frame by frame onto the reference's voxels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medgn.errors import InputDataError


def _geometry_mismatch(pred_path: Path, ref_path: Path) -> str | None:
    """The geometry difference between a prediction and its reference, from the headers alone."""
    from medgn.data.io import geometry_diff, read_header

    pred_h, ref_h = read_header(pred_path), read_header(ref_path)
    diffs = geometry_diff(pred_h, ref_h)
    if not diffs:
        return None
    return (
        f"prediction geometry differs from the reference (prediction vs reference: {'; '.join(diffs)}); "
        f"prediction affine {_fmt_affine(pred_h.affine)} ({pred_path}), reference affine "
        f"{_fmt_affine(ref_h.affine)} ({ref_path})"
    )


def _fmt_affine(affine: Any) -> str:
    rows = np.asarray(affine, dtype=np.float64)
    return "[" + ", ".join("[" + ", ".join(f"{v:.6g}" for v in row) + "]" for row in rows) + "]"


def read_prediction(pred_path: Path, ref: Any) -> Any:
    """A prediction as a label volume on the reference grid: a mask file with the reference's
    geometry (checked from the headers), or a DICOM-SEG whose frames are placed on its voxels."""
    from medgn.data.io import Volume, read_volume

    if pred_path.name.lower().endswith(".seg.dcm"):
        from medgn.data.seg_read import read_seg_on_grid
        from medgn.evaluate.metrics import Segments

        voxels: dict[int, np.ndarray] = {}
        labels = read_seg_on_grid(pred_path, ref.shape, ref.affine, segments=voxels)
        meta: dict[str, Any] = {}
        if sum(idx.size for idx in voxels.values()) > np.count_nonzero(labels):  # segments overlap
            meta["segments"] = Segments(tuple(labels.shape), voxels)
        return Volume(labels, ref.affine, pred_path, "dicom-seg", meta)
    mismatch = _geometry_mismatch(pred_path, ref.path)
    if mismatch:
        raise InputDataError(pred_path, mismatch, expected="the reference's shape, spacing, origin and direction")
    return read_volume(pred_path, label=True)
