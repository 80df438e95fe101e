"""Reading a DICOM Segmentation back onto a reference grid, with pydicom only.

This module owns :func:`read_seg_on_grid`: every frame's pixels are mapped through its own position
and orientation (from its per-frame functional groups, else the shared ones) into the voxels of a
reference grid, so evaluation needs neither highdicom nor torch. A frame off the grid, a malformed
functional group, or a segment number the SegmentSequence does not declare is an input error naming
the file. Segment number ``n`` reads back as the raw label value its Tracking ID records (``label
value 7``, as :mod:`medgn.data.dicom_seg` writes them), else as ``n``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medgn.errors import InputDataError, brief

__all__ = ["GRID_TOL_VOXELS", "LPS_TO_RAS", "TRACKING_PREFIX", "read_seg_on_grid"]

# Tracking ID of a segment medgn writes: the raw label value the segment stands for.
TRACKING_PREFIX = "label value "
# A frame position may differ from a slice centre by this many voxels: exported positions are
# rounded (to 0.01 mm, jittered by micrometres), and the series' own check accepts a quarter of a
# pixel the same way; still half the way to the next voxel, so no frame is ever placed ambiguously.
GRID_TOL_VOXELS = 0.25
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # DICOM LPS <-> RAS: flip x and y


# A frame's plane orientation may differ from two orthogonal unit vectors by this much (float rounding
# of DS values), as the DICOM series reader allows for its slices.
_PLANE_TOL = 1e-3


def _functional_item(path: Path, frame: Any, shared: Any, i: int, name: str) -> Any:
    """The first item of functional group ``name`` of frame i: its own, else the shared one.

    Raises:
        InputDataError: neither the frame's per-frame groups nor the shared groups hold it.
    """
    for group in (frame, shared):
        sequence = getattr(group, name, None) if group is not None else None
        if sequence:
            return sequence[0]
    where = "in its per-frame or the shared functional groups"
    if shared is None:
        where = "in its per-frame functional groups, and the SEG has no SharedFunctionalGroupsSequence"
    raise InputDataError(
        path,
        f"DICOM-SEG frame {i + 1} has no {name} {where}",
        expected="one in every frame's groups or the shared ones",
    )


def _frame_numbers(path: Path, i: int, item: Any, tag: str, count: int) -> np.ndarray:
    """``count`` finite numbers of frame i's multi-valued DS tag, else an InputDataError naming the SEG."""
    raw = getattr(item, tag, None)
    try:
        values = np.asarray([float(v) for v in (raw if raw is not None else [])], dtype=np.float64)
    except (TypeError, ValueError):
        values = np.asarray([], dtype=np.float64)
    if values.shape != (count,) or not np.all(np.isfinite(values)):
        raise InputDataError(
            path,
            f"DICOM-SEG frame {i + 1} has an invalid {tag}",
            got=brief(raw if raw is not None else "none", 120),
            expected=f"{count} finite numbers",
        )
    return values


def _frame_geometry(
    path: Path, frame: Any, shared: Any, i: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, str | None]:
    """(position, row step, column step) in LPS mm, segment number and referenced SOP UID of frame i.

    ``frame`` is the frame's item of PerFrameFunctionalGroupsSequence, ``shared`` the item of
    SharedFunctionalGroupsSequence or None (the shared groups are Type 2: a SEG may hold every
    group per frame).

    Raises:
        InputDataError: a group the frame needs is in neither place, or holds no valid geometry.
    """
    orient = _functional_item(path, frame, shared, i, "PlaneOrientationSequence")
    pixel = _functional_item(path, frame, shared, i, "PixelMeasuresSequence")
    position = _functional_item(path, frame, shared, i, "PlanePositionSequence")
    iop = _frame_numbers(path, i, orient, "ImageOrientationPatient", 6)
    spacing = _frame_numbers(path, i, pixel, "PixelSpacing", 2)  # (between rows, between columns)
    ipp = _frame_numbers(path, i, position, "ImagePositionPatient", 3)
    axes = iop.reshape(2, 3)
    if np.any(np.abs(np.linalg.norm(axes, axis=1) - 1) > _PLANE_TOL) or abs(float(axes[0] @ axes[1])) > _PLANE_TOL:
        raise InputDataError(
            path,
            f"DICOM-SEG frame {i + 1} has an invalid ImageOrientationPatient",
            got=iop.tolist(),
            expected="two orthogonal unit vectors",
        )
    if np.any(spacing <= 0):
        raise InputDataError(
            path, f"DICOM-SEG frame {i + 1} has an invalid PixelSpacing", got=spacing.tolist(), expected="values > 0"
        )
    # A SEG with one segment may hold its identification (and derivation) in the shared groups.
    ident = _functional_item(path, frame, shared, i, "SegmentIdentificationSequence")
    raw_segment = getattr(ident, "ReferencedSegmentNumber", None)
    try:
        segment = int(raw_segment)
    except (TypeError, ValueError):
        raise InputDataError(
            path,
            f"DICOM-SEG frame {i + 1} has no valid ReferencedSegmentNumber",
            got=brief(raw_segment, 60),
            expected="the number of a segment in SegmentSequence",
        ) from None
    # Only the writer's own check needs the referenced slice: a SEG without it reads as None.
    derivation = getattr(frame, "DerivationImageSequence", None) or getattr(shared, "DerivationImageSequence", None)
    sources = getattr(derivation[0], "SourceImageSequence", None) if derivation else None
    ref_uid = getattr(sources[0], "ReferencedSOPInstanceUID", None) if sources else None
    # moving one column steps along the row direction (IOP[:3]), one row along the column direction
    return ipp, iop[3:] * spacing[0], iop[:3] * spacing[1], segment, None if ref_uid is None else str(ref_uid)


def _frame_groups(path: Path, ds: Any, n_frames: int) -> tuple[Sequence[Any], Any]:
    """(one per-frame functional group per frame, the shared functional group or None).

    Raises:
        InputDataError: PerFrameFunctionalGroupsSequence is missing or its length is not the
            number of frames.
    """
    per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
    if not per_frame or len(per_frame) != n_frames:
        raise InputDataError(
            path,
            "DICOM-SEG lacks PerFrameFunctionalGroupsSequence"
            if not per_frame
            else f"DICOM-SEG has {len(per_frame)} per-frame functional groups for {n_frames} frames",
            expected=f"{n_frames} items, one per frame",
        )
    shared_seq = getattr(ds, "SharedFunctionalGroupsSequence", None)
    return per_frame, (shared_seq[0] if shared_seq else None)


def read_seg_on_grid(
    path: str | os.PathLike[str],
    shape: Sequence[int],
    affine: np.ndarray,
    *,
    expected_sources: Sequence[Any] | None = None,
    segments: dict[int, np.ndarray] | None = None,
) -> np.ndarray:
    """A binary DICOM-SEG's segments as an (X, Y, Z) int32 label map on a reference voxel grid.

    Every frame's pixel centres are mapped through the frame's own position and orientation into
    the reference grid (RAS affine); each must land on a voxel centre. Segment number n becomes
    the label value its Tracking ID records (medgn's SEGs), else value n; where segments overlap the
    higher value wins. Every frame must refer to a segment that SegmentSequence declares.

    Args:
        path: the SEG file.
        shape: the reference grid's (X, Y, Z).
        affine: its 4x4 voxel -> RAS affine.
        expected_sources: when given, each frame's referenced SOP instance must be the source
            dataset of the slice it lands on (the writer's own check).
        segments: when given, filled with each declared segment's voxels whatever overlaps them
            (label value -> sorted flat indices into the grid), which the label map cannot hold
            where segments overlap.

    Raises:
        InputDataError: not a readable binary SEG; no segments declared, or a frame referring to
            an undeclared one; a per-frame functional group missing for a frame, or a frame without
            position, orientation, pixel spacing or segment (in its own or the shared groups);
            a frame off the grid or on the wrong slice. The message names the file and what is
            missing.
    """
    import pydicom

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
        pixels = np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for corrupt files
        raise InputDataError(path, f"cannot read the DICOM-SEG ({type(exc).__name__}: {brief(exc, 120)})") from None
    if getattr(ds, "Modality", "") != "SEG" or getattr(ds, "SegmentationType", "") != "BINARY":
        raise InputDataError(
            path,
            "not a binary DICOM Segmentation",
            got=f"Modality {getattr(ds, 'Modality', None)}, SegmentationType {getattr(ds, 'SegmentationType', None)}",
            expected="Modality SEG, SegmentationType BINARY",
        )
    pixels = pixels.reshape(-1, int(ds.Rows), int(ds.Columns))  # (frames, rows, cols)
    values = _segment_values(path, ds)
    per_frame, shared = _frame_groups(path, ds, pixels.shape[0])
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    out = np.zeros(tuple(int(s) for s in shape), dtype=np.int32)
    rr, cc = np.meshgrid(np.arange(pixels.shape[1]), np.arange(pixels.shape[2]), indexing="ij")
    voxels: dict[int, list[np.ndarray]] = {value: [] for value in values.values()}
    for i in range(pixels.shape[0]):
        ipp, row_step, col_step, segment, ref_uid = _frame_geometry(path, per_frame[i], shared, i)
        if segment not in values:
            raise InputDataError(
                path,
                f"DICOM-SEG frame {i + 1} refers to segment {segment}, which SegmentSequence does not declare",
                expected=f"one of the declared segments {sorted(values)}",
            )
        lps = ipp + rr[..., None] * row_step + cc[..., None] * col_step  # (rows, cols, 3)
        ijk = (lps @ LPS_TO_RAS.T) @ inv[:3, :3].T + inv[:3, 3]
        idx = np.round(ijk).astype(np.int64)
        if (
            np.max(np.abs(ijk - idx)) > GRID_TOL_VOXELS
            or idx.min() < 0
            or np.any(idx.max(axis=(0, 1)) >= np.asarray(out.shape))
        ):
            raise InputDataError(
                path,
                f"frame {i + 1} does not lie on the reference grid",
                got=f"ImagePositionPatient {ipp.tolist()}",
                expected=f"voxel centres of a {tuple(out.shape)} grid",
            )
        if expected_sources is not None:
            k = int(idx[0, 0, 2])
            if len(np.unique(idx[..., 2])) != 1 or ref_uid != str(expected_sources[k].SOPInstanceUID):
                raise InputDataError(
                    path,
                    f"frame {i + 1} references another slice than the one it lies on",
                    got=ref_uid,
                    expected=str(expected_sources[k].SOPInstanceUID),
                )
        on = pixels[i] > 0
        where = (idx[..., 0][on], idx[..., 1][on], idx[..., 2][on])
        out[where] = np.maximum(out[where], values[segment])
        if segments is not None:
            voxels[values[segment]].append(np.ravel_multi_index(where, out.shape))
    if segments is not None:
        segments.update(
            {v: np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64) for v, parts in voxels.items()}
        )
    return out


def _segment_values(path: Path, ds: Any) -> dict[int, int]:
    """Segment number -> label value of every segment SegmentSequence declares.

    The value is the one medgn's Tracking ID records (``label value 7``); a segment from elsewhere,
    without such a Tracking ID, keeps its number.

    Raises:
        InputDataError: no segment declared, a segment without a positive SegmentNumber or declared
            twice, or a medgn Tracking ID that names no positive int32 label value (a label value 0
            would be background: reading the segment as its number instead would be a guess).
    """
    items = getattr(ds, "SegmentSequence", None)
    if not items:
        raise InputDataError(
            path, "DICOM-SEG declares no segments (no SegmentSequence)", expected="one SegmentSequence item per segment"
        )
    values: dict[int, int] = {}
    for item in items:
        raw = getattr(item, "SegmentNumber", None)
        try:
            number = int(raw)
        except (TypeError, ValueError):
            number = 0
        if number <= 0 or number in values:
            raise InputDataError(
                path,
                "DICOM-SEG segment declared twice" if number in values else "DICOM-SEG segment without a valid number",
                got=f"SegmentNumber {brief(raw, 60)}",
                expected="distinct positive segment numbers in SegmentSequence",
            )
        tracking = str(getattr(item, "TrackingID", "") or "")
        if not tracking.startswith(TRACKING_PREFIX):
            values[number] = number
            continue
        try:
            value = int(tracking[len(TRACKING_PREFIX) :])
        except ValueError:
            value = 0
        if not 0 < value <= np.iinfo(np.int32).max:
            raise InputDataError(
                path,
                f"DICOM-SEG segment {number} has a Tracking ID that names no foreground label value",
                got=brief(tracking, 80),
                expected=f"'{TRACKING_PREFIX}N' with N from 1 to {np.iinfo(np.int32).max}",
            )
        values[number] = value
    return values
