"""Tests of reading a DICOM-SEG onto a reference grid (medgn.data.dicom_seg.read_seg_on_grid) when the
SEG is malformed: a missing functional group, fewer per-frame groups than frames, invalid frame geometry,
a frame referring to a segment SegmentSequence does not declare, a medgn Tracking ID naming label 0.
Each is an InputDataError naming the file and what is missing, and ``medgn evaluate`` fails that case
only (exit 3), where these were internal errors or a silently invented label.

The SEG is built here with highdicom over a small in-memory CT series (oblique, unequal spacings), and
the mutations are made with pydicom on the written file.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medgn.cli import main
from medgn.data.dicom_seg import read_seg_on_grid
from medgn.errors import InputDataError

SHAPE = (6, 5, 4)  # (X = columns, Y = rows, Z = slices): every axis a different length
ROW_MM, COL_MM, SLICE_MM = 1.0, 0.8, 1.25  # all different, so a swapped axis moves the frames
ROW = np.array([0.8, 0.6, 0.0])  # an oblique plane in LPS
COL = np.array([-0.6, 0.8, 0.0])
ORIGIN = np.array([-20.5, 13.25, 40.0])


def _sources() -> list[Dataset]:
    """The SHAPE series as pydicom datasets, slice k at ORIGIN + k * SLICE_MM * normal."""
    normal = np.cross(ROW, COL)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for k in range(SHAPE[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "CT", "T^S", "P", "", ""
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "", "", "", "", ""
        ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = 1, k + 1, "test"
        ds.ImagePositionPatient = [float(v) for v in ORIGIN + k * SLICE_MM * normal]
        ds.ImageOrientationPatient = [float(v) for v in (*ROW, *COL)]
        ds.PixelSpacing, ds.SliceThickness = [ROW_MM, COL_MM], SLICE_MM
        ds.Rows, ds.Columns = SHAPE[1], SHAPE[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.zeros((SHAPE[1], SHAPE[0]), np.uint16).tobytes()
        out.append(ds)
    return out


def _affine() -> np.ndarray:
    """The series' voxel (X, Y, Z) -> RAS affine."""
    lps = np.eye(4)
    lps[:3, :3] = np.stack([ROW * COL_MM, COL * ROW_MM, np.cross(ROW, COL) * SLICE_MM], axis=1)
    lps[:3, 3] = ORIGIN
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _mask() -> np.ndarray:
    """(X, Y, Z) labels 0, 1, 3 with both foreground values on several slices."""
    mask = np.zeros(SHAPE, dtype=np.int32)
    mask[1:4, 1:4, 0:3] = 3
    mask[4, 0:2, 1:4] = 1
    return mask


def write_seg(
    path: Path, mask: np.ndarray, label_values: tuple[int, ...] = (1, 3), *, segments: np.ndarray | None = None
) -> Path:
    """A binary SEG of ``mask`` over :func:`_sources`, segment i+1 = ``label_values[i]`` (medgn's Tracking IDs).

    ``segments``: (X, Y, Z, S) binary masks instead, one per segment, which may overlap.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name="test", version="1", family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=f"class {i + 1}",
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_id=f"label value {v}",
            tracking_uid=hd.UID(),
        )
        for i, v in enumerate(label_values)
    ]
    if segments is None:
        classes = np.zeros(SHAPE, dtype=np.uint8)
        for i, v in enumerate(label_values):
            classes[mask == v] = i + 1
        pixels = np.stack([classes[:, :, k].T for k in range(SHAPE[2])])  # (Z, rows = Y, cols = X)
    else:
        pixels = segments.astype(np.uint8).transpose(2, 1, 0, 3)  # (Z, rows = Y, cols = X, S)
    seg = hd.seg.Segmentation(
        source_images=_sources(),
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=2,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
        omit_empty_frames=False,
    )
    seg.save_as(path)
    return path


@pytest.fixture
def seg(tmp_path: Path) -> Path:
    return write_seg(tmp_path / "good.seg.dcm", _mask())


def _frame(ds: Dataset, i: int) -> Dataset:
    return ds.PerFrameFunctionalGroupsSequence[i]


def _shared(ds: Dataset) -> Dataset:
    return ds.SharedFunctionalGroupsSequence[0]


def _ident(ds: Dataset, i: int) -> Dataset:
    """Frame i's segment identification (per frame, or shared for a single segment)."""
    holder = _frame(ds, i) if "SegmentIdentificationSequence" in _frame(ds, i) else _shared(ds)
    return holder.SegmentIdentificationSequence[0]


def _set(item: Any, name: str, value: Any) -> None:
    setattr(item, name, value)


MALFORMED: dict[str, tuple[Callable[[Dataset], None], str]] = {
    "no per-frame groups": (
        lambda ds: delattr(ds, "PerFrameFunctionalGroupsSequence"),
        "DICOM-SEG lacks PerFrameFunctionalGroupsSequence (expected 8 items, one per frame)",
    ),
    "fewer per-frame groups than frames": (
        lambda ds: _set(ds, "PerFrameFunctionalGroupsSequence", ds.PerFrameFunctionalGroupsSequence[:5]),
        "DICOM-SEG has 5 per-frame functional groups for 8 frames",
    ),
    "no shared groups (orientation only there)": (
        lambda ds: delattr(ds, "SharedFunctionalGroupsSequence"),
        "frame 1 has no PlaneOrientationSequence in its per-frame functional groups, and the SEG has no "
        "SharedFunctionalGroupsSequence",
    ),
    "a frame without its position": (
        lambda ds: delattr(_frame(ds, 2), "PlanePositionSequence"),
        "DICOM-SEG frame 3 has no PlanePositionSequence in its per-frame or the shared functional groups",
    ),
    "no pixel measures": (
        lambda ds: delattr(_shared(ds), "PixelMeasuresSequence"),
        "DICOM-SEG frame 1 has no PixelMeasuresSequence",
    ),
    "a position of two numbers": (
        lambda ds: _set(_frame(ds, 1).PlanePositionSequence[0], "ImagePositionPatient", [1.0, 2.0]),
        "DICOM-SEG frame 2 has an invalid ImagePositionPatient",
    ),
    "an orientation that is not unit vectors": (
        lambda ds: _set(_shared(ds).PlaneOrientationSequence[0], "ImageOrientationPatient", [0, 0, 0, 0, 1, 0]),
        "DICOM-SEG frame 1 has an invalid ImageOrientationPatient",
    ),
    "a zero pixel spacing": (
        lambda ds: _set(_shared(ds).PixelMeasuresSequence[0], "PixelSpacing", [0.0, 0.8]),
        "DICOM-SEG frame 1 has an invalid PixelSpacing",
    ),
    "a frame referring to an undeclared segment": (
        lambda ds: _set(_ident(ds, 0), "ReferencedSegmentNumber", 7),
        "DICOM-SEG frame 1 refers to segment 7, which SegmentSequence does not declare (expected one of the "
        "declared segments [1, 2])",
    ),
    "a frame without its segment number": (
        lambda ds: delattr(_ident(ds, 4), "ReferencedSegmentNumber"),
        "DICOM-SEG frame 5 has no valid ReferencedSegmentNumber",
    ),
    "no SegmentSequence": (lambda ds: delattr(ds, "SegmentSequence"), "DICOM-SEG declares no segments"),
    "a segment number declared twice": (
        lambda ds: _set(ds.SegmentSequence[1], "SegmentNumber", 1),
        "DICOM-SEG segment declared twice (got SegmentNumber 1",
    ),
    "a medgn Tracking ID naming label value 0": (
        lambda ds: _set(ds.SegmentSequence[0], "TrackingID", "label value 0"),
        "DICOM-SEG segment 1 has a Tracking ID that names no foreground label value (got label value 0",
    ),
}


def test_the_fixture_seg_reads_back_as_its_mask(seg: Path) -> None:
    np.testing.assert_array_equal(read_seg_on_grid(seg, SHAPE, _affine()), _mask())
    ds = pydicom.dcmread(seg)
    assert len(ds.PerFrameFunctionalGroupsSequence) == 8  # 2 segments x 4 slices, as the messages say
    assert "PlaneOrientationSequence" not in _frame(ds, 0)  # highdicom shares the plane


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_seg_is_an_input_error_naming_the_file_and_what_is_missing(seg: Path, case: str) -> None:
    mutate, message = MALFORMED[case]
    ds = pydicom.dcmread(seg)
    mutate(ds)
    bad = seg.with_name("bad.seg.dcm")
    ds.save_as(bad)
    with pytest.raises(InputDataError) as info:
        read_seg_on_grid(bad, SHAPE, _affine())
    assert info.value.code == 3
    assert info.value.one_line().startswith(f"{bad}: ") and message in info.value.one_line(), info.value.one_line()


def test_a_seg_with_every_group_per_frame_needs_no_shared_groups(seg: Path) -> None:
    """SharedFunctionalGroupsSequence is Type 2: a SEG may hold each group in every frame instead."""
    ds = pydicom.dcmread(seg)
    shared = _shared(ds)
    for frame in ds.PerFrameFunctionalGroupsSequence:
        for name in shared.dir():
            if name.endswith("Sequence") and name not in frame:
                setattr(frame, name, getattr(shared, name))
    del ds.SharedFunctionalGroupsSequence
    ds.save_as(seg.with_name("per_frame.seg.dcm"))
    np.testing.assert_array_equal(read_seg_on_grid(seg.with_name("per_frame.seg.dcm"), SHAPE, _affine()), _mask())


def test_evaluate_fails_a_malformed_seg_case_and_scores_the_others(
    seg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    for cid in ("a", "b", "c"):
        nib.save(nib.Nifti1Image(_mask(), _affine()), str(ref / f"{cid}.nii.gz"))
    (pred / "a.seg.dcm").write_bytes(seg.read_bytes())
    ds = pydicom.dcmread(seg)
    del ds.PerFrameFunctionalGroupsSequence
    ds.save_as(pred / "b.seg.dcm")
    ds = pydicom.dcmread(seg)
    _ident(ds, 0).ReferencedSegmentNumber = 7  # not scored as a label 7
    ds.save_as(pred / "c.seg.dcm")
    out = tmp_path / "out"
    code = main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--out", str(out), "--worst-k", "0"])
    captured = capsys.readouterr()
    assert code == 3, captured.err
    assert "cases 3: evaluated 1, missing 0, failed 2" in captured.out
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2 and "internal error" not in captured.err, errors
    assert errors[0].startswith(f"medgn: error: case b: {pred / 'b.seg.dcm'}: DICOM-SEG lacks PerFrame"), errors
    assert errors[1].startswith(f"medgn: error: case c: {pred / 'c.seg.dcm'}: DICOM-SEG frame 1 refers to segment 7")
    csv_text = (out / "metrics.csv").read_text()
    assert "a,1,1.0," in csv_text and "a,3,1.0," in csv_text and ",7," not in csv_text


def test_overlapping_segments_are_each_scored_whole(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """DICOM allows segments that share voxels (a structure inside another); a label map cannot hold them.

    Segment 1 equal to reference label 1 scored Dice 0.93 where segment 3 covered part of it.
    """
    whole = np.zeros(SHAPE, dtype=bool)
    whole[1:5, 0:4, 0:4] = True
    inner = np.zeros(SHAPE, dtype=bool)
    inner[2:4, 1:3, 1:3] = True  # inside segment 1
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    write_seg(pred / "c.seg.dcm", _mask(), segments=np.stack([whole, inner], axis=-1))
    nib.save(nib.Nifti1Image(whole.astype(np.uint8), _affine()), str(ref / "c.nii.gz"))  # label 1 only
    voxels: dict[int, np.ndarray] = {}
    labels = read_seg_on_grid(pred / "c.seg.dcm", SHAPE, _affine(), segments=voxels)
    assert sorted(voxels) == [1, 3] and voxels[1].size == whole.sum() and voxels[3].size == inner.sum()
    assert (labels == 1).sum() == whole.sum() - inner.sum()  # the label map: the higher value wins
    out = tmp_path / "out"
    code = main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--out", str(out), "--worst-k", "0"])
    assert code == 0, capsys.readouterr().err
    rows = {row["label"]: row for row in csv.DictReader((out / "metrics.csv").open())}
    assert float(rows["1"]["dice"]) == 1.0 and float(rows["1"]["hd95"]) == 0.0
    assert float(rows["3"]["dice"]) == 0.0  # predicted, absent from the reference
