"""DICOM Segmentation objects: written for a DICOM series input, read back onto a reference grid.

This module owns :func:`seg_sources` (the source series' slices as pydicom datasets, each placed on
the input volume's slice index from its ImagePositionPatient, refusing a series that lacks the tags
a SEG must copy or reference), :func:`write_dicom_seg` (one binary segment per foreground class,
built with highdicom, frames on the source slices, written atomically and re-read to check that
every frame lies on the slice it references before it is published) and :func:`read_seg_on_grid`
(pydicom only: every frame's pixels are mapped through its own position and orientation into the
voxels of a reference grid, so evaluation needs neither highdicom nor torch). Segment number ``n``
is class index ``n`` (DICOM numbers segments 1, 2, ...); each segment's Tracking ID records the raw
label value it stands for (``label value 7``), so a dataset with label values 0, 1, 7 reads back as
0, 1, 7. A SEG from elsewhere, without such Tracking IDs, reads back as segment numbers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medgn.errors import InputDataError, UsageError, brief

if TYPE_CHECKING:
    from medgn.data.io import Volume

__all__ = ["REQUIRED_TAGS", "SEG_SUFFIX", "read_seg_on_grid", "seg_sources", "write_dicom_seg"]

SEG_SUFFIX = ".seg.dcm"
# Tracking ID of a segment medgn writes: the raw label value the segment stands for.
_TRACKING_PREFIX = "label value "
# What a SEG copies (patient/study), references (series/instance/class) or needs for its frame
# geometry; a series without one of these cannot be referenced correctly.
REQUIRED_TAGS = (
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
)  # fmt: skip
# Type 2 attributes a SEG copies from its source (present, possibly empty): anonymised exports often
# drop them, and DICOM allows them empty, so a source without one gets it empty.
_TYPE2_COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber",
)  # fmt: skip
# Tags every slice of the series must share for one SEG to reference them all.
_SHARED_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
# A frame position may differ from a slice centre by this many voxels (float rounding of
# DS values written with 16 characters), never by a real fraction of a slice.
GRID_TOL_VOXELS = 1e-3
_LPS = np.diag([-1.0, -1.0, 1.0])  # DICOM LPS <-> RAS: flip x and y


def _slice_index(reference: Volume, ipp: Sequence[float]) -> float:
    """The (fractional) slice index k of a position on the reference grid (RAS affine)."""
    ras = _LPS @ np.asarray(ipp, dtype=np.float64)
    ijk = np.linalg.solve(reference.affine[:3, :3], ras - reference.affine[:3, 3])
    return float(ijk[2]) if abs(ijk[0]) < GRID_TOL_VOXELS and abs(ijk[1]) < GRID_TOL_VOXELS else float("nan")


def seg_sources(reference: Volume) -> list[Any]:
    """The source slices of a DICOM volume as pydicom datasets, ordered by slice index k.

    Type 2 patient and study attributes a slice lacks are added empty (the SEG copies them).

    Raises:
        InputDataError: a slice is unreadable, lacks a tag in :data:`REQUIRED_TAGS`, has a
            non-numeric position or plane, differs from the first slice in study, series, frame
            of reference, orientation or spacing, or its position is not one of the volume's
            slices (exit 3). Nothing is written by this check.
    """
    import pydicom

    files = reference.meta.get("files") if reference.format == "dicom" else None
    if not files:
        raise UsageError(
            reference.path,
            "a DICOM-SEG needs a DICOM series input",
            got=reference.format,
            expected="a DICOM series folder (use --output-format nifti)",
        )
    by_k: dict[int, Any] = {}
    first: tuple[Any, np.ndarray, np.ndarray] | None = None
    for name in files:
        try:  # force: files without the 128-byte preamble, which the series reader accepted
            ds = pydicom.dcmread(name, stop_before_pixels=True, force=True)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for corrupt files
            raise InputDataError(name, "cannot read the DICOM slice's header for a DICOM-SEG", got=brief(exc)) from None
        missing = [tag for tag in REQUIRED_TAGS if not str(getattr(ds, tag, "") or "").strip()]
        if missing:
            raise InputDataError(
                name,
                f"DICOM slice lacks tags a DICOM-SEG needs: {', '.join(missing)}",
                expected="a series with study, series, instance and frame-of-reference UIDs and plane geometry "
                "(or --output-format nifti)",
            )
        # Read as numbers; their validity (unit, orthogonal, positive) the preflight of this very
        # series has checked. What a SEG needs beyond it: the same UIDs and, within highdicom's
        # tighter tolerance, the same plane on every slice.
        ipp = _numbers(name, ds, "ImagePositionPatient", 3)
        iop = _numbers(name, ds, "ImageOrientationPatient", 6)
        spacing = _numbers(name, ds, "PixelSpacing", 2)
        if first is None:
            first = (ds, iop, spacing)
        else:
            ds0, iop0, spacing0 = first
            differ = [tag for tag in _SHARED_TAGS if str(getattr(ds, tag)) != str(getattr(ds0, tag))]
            differ += ["ImageOrientationPatient"] if np.max(np.abs(iop - iop0)) > 1e-4 else []
            differ += ["PixelSpacing"] if np.max(np.abs(spacing - spacing0)) > 1e-4 * float(spacing0.max()) else []
            if differ:
                raise InputDataError(
                    name,
                    f"DICOM slices differ in {', '.join(differ)}",
                    expected=f"the values of {files[0]} on every slice of one series",
                )
        for tag in _TYPE2_COPIED:
            if tag not in ds:
                setattr(ds, tag, None)  # present and empty
        k = _slice_index(reference, ipp.tolist())
        if (
            not np.isfinite(k)
            or abs(k - round(k)) > GRID_TOL_VOXELS
            or not 0 <= round(k) < reference.shape[2]
            or round(k) in by_k
        ):
            raise InputDataError(
                name,
                "slice position is not a slice of the series grid",
                got=f"ImagePositionPatient {ipp.tolist()}",
                expected=f"one of {reference.shape[2]} slices",
            )
        by_k[round(k)] = ds
    uids = [str(ds.SOPInstanceUID) for ds in by_k.values()]
    repeated = sorted({uid for uid in uids if uids.count(uid) > 1})
    if repeated:  # a SEG frame references its slice by this UID alone
        raise InputDataError(
            reference.path,
            f"{len(repeated)} SOPInstanceUID(s) repeat across the series' slices",
            got=repeated[:3],
            expected="a distinct SOPInstanceUID on every slice (or --output-format nifti)",
        )
    ordered = [by_k[k] for k in range(reference.shape[2])]
    _trial_segmentation(reference, ordered)
    return ordered


def _trial_segmentation(reference: Volume, sources: Sequence[Any]) -> None:
    """Build an empty one-frame SEG over the first slice: the patient, study and equipment values
    highdicom refuses (a PatientSex outside M/F/O, a malformed date or time) fail the case here,
    before anything is predicted or written, rather than after the mask was published."""
    first = sources[0]
    frame = np.zeros((1, int(first.Rows), int(first.Columns)), dtype=np.uint8)
    _segmentation(reference, [first], frame, np.asarray([0, 1]), {})


def _numbers(name: str, ds: Any, tag: str, count: int) -> np.ndarray:
    """``count`` finite numbers of a multi-valued DS tag, else an InputDataError naming the slice."""
    try:
        values = np.asarray([float(v) for v in getattr(ds, tag)], dtype=np.float64)
    except (TypeError, ValueError):
        values = np.asarray([], dtype=np.float64)
    if values.shape != (count,) or not np.all(np.isfinite(values)):
        raise InputDataError(
            name,
            f"invalid {tag} for a DICOM-SEG",
            got=str(getattr(ds, tag, ""))[:120],
            expected=f"{count} finite numbers",
        )
    return values


def _descriptions(label_values: Sequence[int], label_names: Mapping[int, str]) -> list[Any]:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    import medgn

    algorithm = hd.AlgorithmIdentificationSequence(
        name="medgn", version=medgn.__version__, family=codes.cid7162.ArtificialIntelligence
    )
    return [
        hd.seg.SegmentDescription(
            segment_number=i,
            segment_label=label_names.get(int(v), f"class {i}")[:64],  # LO: at most 64 characters
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_id=f"{_TRACKING_PREFIX}{int(v)}",
            tracking_uid=hd.UID(),
        )
        for i, v in enumerate(label_values)
        if i > 0
    ]


def write_dicom_seg(
    mask: np.ndarray,
    reference: Volume,
    sources: Sequence[Any],
    label_values: Sequence[int],
    label_names: Mapping[int, str],
    out_path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> Path:
    """Write a label mask on a DICOM series' grid as a binary DICOM Segmentation, atomically.

    Args:
        mask: (X, Y, Z) raw label values on the reference grid (file voxel order).
        reference: the DICOM input volume.
        sources: from :func:`seg_sources` (slice k of the grid is ``sources[k]``).
        label_values: raw label value of class index i; classes 1.. become segments 1..
        label_names: label value -> name for the segment labels ("class i" when absent).
        out_path: destination, ``<case>.seg.dcm``.
        overwrite: replace an existing file.

    Returns:
        The final path.

    Raises:
        InputDataError: highdicom refuses the sources, or a frame read back does not lie on the
            slice it references (nothing written).
    """
    from medgn.files import atomic_path

    values = np.asarray(label_values, dtype=np.int64)
    classes = np.searchsorted(values, mask)  # raw label value -> class index (values are sorted)
    classes = np.where(values[np.clip(classes, 0, len(values) - 1)] == mask, classes, 0)
    dtype = np.uint8 if len(values) < 256 else np.uint16
    frames = np.stack([classes[:, :, k].T for k in range(mask.shape[2])]).astype(dtype)  # (Z, rows=Y, cols=X)
    seg = _segmentation(reference, sources, frames, values, label_names)
    out_path = Path(out_path)
    with atomic_path(out_path, overwrite=overwrite) as tmp:
        seg.save_as(tmp)
        check = read_seg_on_grid(tmp, reference.shape, reference.affine, expected_sources=sources)
        if not np.array_equal(check.astype(np.int64), np.asarray(mask, dtype=np.int64)):
            raise InputDataError(
                out_path,
                "DICOM-SEG read back differs from the mask, nothing written",
                expected="every frame on the slice it references",
            )
    return out_path


def _segmentation(
    reference: Volume, sources: Sequence[Any], frames: np.ndarray, values: np.ndarray, label_names: Mapping[int, str]
) -> Any:
    """The highdicom Segmentation of ``frames`` (Z, rows, cols) class indices over ``sources``.

    Raises:
        InputDataError: highdicom refuses the sources (exit 3).
    """
    import highdicom as hd

    import medgn

    try:
        return _highdicom_segmentation(hd, medgn, sources, frames, values, label_names)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:  # highdicom's checks
        raise InputDataError(
            reference.path,
            "cannot build a DICOM-SEG from this series",
            got=(str(exc).strip().splitlines() or [type(exc).__name__])[0][:200],
            expected="a series highdicom accepts as SEG source (or --output-format nifti)",
        ) from None


def _highdicom_segmentation(
    hd: Any, medgn: Any, sources: Sequence[Any], frames: np.ndarray, values: np.ndarray, label_names: Mapping[int, str]
) -> Any:
    return hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_descriptions(values.tolist(), label_names),
        series_instance_uid=hd.UID(),
        series_number=9001,  # above scanner series numbers, so viewers list it after the source
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medgn",
        manufacturer_model_name="medgn",
        software_versions=medgn.__version__,
        device_serial_number="none",
        omit_empty_frames=False,  # every slice of every segment: an empty class still reads back
    )


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
    for i in range(pixels.shape[0]):
        ipp, row_step, col_step, segment, ref_uid = _frame_geometry(path, per_frame[i], shared, i)
        if segment not in values:
            raise InputDataError(
                path,
                f"DICOM-SEG frame {i + 1} refers to segment {segment}, which SegmentSequence does not declare",
                expected=f"one of the declared segments {sorted(values)}",
            )
        lps = ipp + rr[..., None] * row_step + cc[..., None] * col_step  # (rows, cols, 3)
        ijk = (lps @ _LPS.T) @ inv[:3, :3].T + inv[:3, 3]
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
        target = out[idx[..., 0][on], idx[..., 1][on], idx[..., 2][on]]
        out[idx[..., 0][on], idx[..., 1][on], idx[..., 2][on]] = np.maximum(target, values[segment])
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
        if not tracking.startswith(_TRACKING_PREFIX):
            values[number] = number
            continue
        try:
            value = int(tracking[len(_TRACKING_PREFIX) :])
        except ValueError:
            value = 0
        if not 0 < value <= np.iinfo(np.int32).max:
            raise InputDataError(
                path,
                f"DICOM-SEG segment {number} has a Tracking ID that names no foreground label value",
                got=brief(tracking, 80),
                expected=f"'{_TRACKING_PREFIX}N' with N from 1 to {np.iinfo(np.int32).max}",
            )
        values[number] = value
    return values
