"""DICOM Segmentation objects: written for a DICOM series input, read back onto a reference grid.

This module owns :func:`seg_sources` (the source series' slices as pydicom datasets, each placed on
the input volume's slice index from its ImagePositionPatient, refusing a series that lacks the tags
a SEG must copy or reference), :func:`write_dicom_seg` (one binary segment per foreground class,
built with highdicom, frames on the source slices, written atomically and re-read to check that
every frame lies on the slice it references before it is published) and :func:`read_seg_on_grid`
(in :mod:`medgn.data.seg_read`, re-exported here: pydicom only, every frame's pixels mapped through
its own position and orientation into the voxels of a reference grid). Segment number ``n``
is class index ``n`` (DICOM numbers segments 1, 2, ...); each segment's Tracking ID records the raw
label value it stands for (``label value 7``), so a dataset with label values 0, 1, 7 reads back as
0, 1, 7. A SEG from elsewhere, without such Tracking IDs, reads back as segment numbers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medgn.data.seg_read import GRID_TOL_VOXELS, LPS_TO_RAS, TRACKING_PREFIX, read_seg_on_grid
from medgn.errors import InputDataError, UsageError, brief

if TYPE_CHECKING:
    from medgn.data.io import Volume

__all__ = ["REQUIRED_TAGS", "SEG_SUFFIX", "read_seg_on_grid", "seg_sources", "write_dicom_seg"]

SEG_SUFFIX = ".seg.dcm"
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


def _slice_index(reference: Volume, ipp: Sequence[float]) -> float:
    """The (fractional) slice index k of a position on the reference grid (RAS affine)."""
    ras = LPS_TO_RAS @ np.asarray(ipp, dtype=np.float64)
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


def _segment_label(name: str) -> str:
    """A label name as a SegmentLabel (LO): no backslash (the value separator) or control characters,
    at most 64 characters; the text itself is kept, in UTF-8 (see :func:`write_dicom_seg`)."""
    return re.sub(r"[\\\x00-\x1f\x7f]", "_", name)[:64] or "unnamed"


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
            segment_label=_segment_label(label_names.get(int(v), f"class {i}")),
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_id=f"{TRACKING_PREFIX}{int(v)}",
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
    # UTF-8 for every text value: a label such as a Japanese organ name, or a patient name the
    # source wrote in another character set, is kept rather than written as '?'.
    seg.SpecificCharacterSet = "ISO_IR 192"
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
