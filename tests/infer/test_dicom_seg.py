"""DICOM-SEG output: frames on the source slices they reference, read back by highdicom and pydicom.

Series are built here with pydicom (axial, coronal, oblique, and one stored in reverse slice order:
file names and instance numbers descending along the slice normal), segmented with the
intensity-threshold network (class 1 exactly where a voxel is above the background), and the SEG is
checked against the source files themselves: each frame's ImagePositionPatient must equal the
position of the slice whose SOP instance it references, and its pixels must equal that slice's
pixels thresholded, read with highdicom and independently with pydicom.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from _infer_fixtures import ThresholdNet, blob, plan, save_run, write_image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medgn.cli import main
from medgn.evaluate.run import evaluate
from medgn.infer.predictor import Predictor
from medgn.infer.run import infer

# Pixel spacing (between rows, between columns) and slice step in mm: all different, so a swapped
# axis changes positions, not only orientations.
ROW_MM, COL_MM, SLICE_MM = 1.0, 0.8, 1.25
BLOB, BACKGROUND = 200, 10  # stored values; the threshold network splits them after z-scoring


def _rotation(angle_deg: float, axis: tuple[float, float, float]) -> np.ndarray:
    a = np.asarray(axis) / np.linalg.norm(axis)
    t = np.deg2rad(angle_deg)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k  # Rodrigues' formula


ORIENTATIONS = {  # (row cosine, column cosine) in LPS
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "oblique": tuple(tuple(v) for v in _rotation(25.0, (1.0, 0.5, 0.2)).T[:2]),
    "reversed": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
}


def write_series(
    folder: Path,
    volume: np.ndarray,
    kind: str,
    *,
    drop: tuple[str, ...] = (),
    mutate: Callable[[Dataset, int], None] | None = None,
) -> tuple[Path, np.ndarray]:
    """Write ``volume`` (X=columns, Y=rows, Z=slices) as a CT series; returns (folder, RAS affine).

    ``drop``: tags left out of every slice; ``mutate(ds, k)``: changes slice k before it is saved.
    """
    folder.mkdir(parents=True)
    row, col = (np.asarray(v, dtype=np.float64) for v in ORIENTATIONS[kind])
    normal = np.cross(row, col)
    origin = np.array([-20.5, 13.25, 40.0])
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    nz = volume.shape[2]
    for k in range(nz):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
            "CT",
            "Test^Seg",
            "P1",
            "19700101",
            "O",
        )
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = (
            "20260101",
            "120000",
            "1",
            "A1",
            "",
        )
        ds.SeriesNumber, ds.Manufacturer = 3, "test"
        # The reversed series stores slice k under a descending instance number and file name.
        ds.InstanceNumber = nz - k if kind == "reversed" else k + 1
        ds.ImagePositionPatient = [float(v) for v in origin + k * SLICE_MM * normal]
        ds.ImageOrientationPatient = [float(v) for v in (*row, *col)]
        ds.PixelSpacing, ds.SliceThickness = [ROW_MM, COL_MM], SLICE_MM
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T.astype(np.int16)).tobytes()  # (rows, cols)
        for tag in drop:
            delattr(ds, tag)
        if mutate is not None:
            mutate(ds, k)
        name = f"{(nz - 1 - k) if kind == 'reversed' else k:03d}.dcm"
        ds.save_as(folder / name, enforce_file_format=True)
    lps = np.eye(4)
    lps[:3, :3] = np.stack([row * COL_MM, col * ROW_MM, normal * SLICE_MM], axis=1)
    lps[:3, 3] = origin
    return folder, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def volume(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.where(blob(), BLOB, BACKGROUND + rng.integers(0, 5, blob().shape)).astype(np.int16)


def _ras_spacing(affine: np.ndarray) -> list[float]:
    import nibabel as nib

    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    out = [0.0] * 3
    for voxel_axis, (world_axis, _) in enumerate(nib.orientations.io_orientation(affine)):
        out[int(world_axis)] = float(spacing[voxel_axis])
    return out


def _frames_by_source(seg_path: Path) -> list[tuple[str, list[float], int, np.ndarray]]:
    """(referenced SOP UID, position, segment number, pixels) per frame, read with pydicom only."""
    ds = pydicom.dcmread(seg_path)
    pixels = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    out = []
    shared = ds.SharedFunctionalGroupsSequence[0]
    for i, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        uid = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        pos = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        ident = getattr(frame, "SegmentIdentificationSequence", None) or shared.SegmentIdentificationSequence
        out.append((uid, pos, int(ident[0].ReferencedSegmentNumber), pixels[i]))
    return out


@pytest.mark.parametrize("kind", list(ORIENTATIONS))
def test_every_seg_frame_lands_on_the_source_slice_it_claims(kind: str, tmp_path: Path) -> None:
    import highdicom as hd

    series, ras = write_series(tmp_path / "in" / f"{kind}_scan", volume(), kind)
    predictor = Predictor.from_modules(
        [ThresholdNet()], {**plan(_ras_spacing(ras)), "dataset": {"labels": {"background": 0, "lesion": 1}}}
    )
    report = infer(predictor, series, tmp_path / "out")
    assert report.exit_code == 0
    seg_path = tmp_path / "out" / f"{kind}_scan.seg.dcm"
    assert (tmp_path / "out" / f"{kind}_scan.nii.gz").is_file()  # DICOM in: both outputs by default
    sources = {}
    for f in sorted(series.iterdir()):
        ds = pydicom.dcmread(f)
        sources[str(ds.SOPInstanceUID)] = ([float(v) for v in ds.ImagePositionPatient], ds.pixel_array)
    frames = _frames_by_source(seg_path)
    assert len(frames) == len(sources)  # one segment, one frame per source slice
    for uid, pos, segment, pixels in frames:
        src_pos, src_pixels = sources[uid]
        assert segment == 1
        np.testing.assert_allclose(pos, src_pos, atol=1e-4)
        np.testing.assert_array_equal(pixels > 0, src_pixels > (BLOB + BACKGROUND) / 2)
    seg = hd.seg.segread(seg_path)
    assert seg.SeriesInstanceUID != next(iter(pydicom.dcmread(f) for f in series.iterdir())).SeriesInstanceUID
    assert seg.FrameOfReferenceUID == pydicom.dcmread(next(series.iterdir())).FrameOfReferenceUID
    assert seg.get_segment_description(1).SegmentLabel == "lesion"
    uids = list(sources)
    by_source = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1]
    )  # (n, rows, cols, 1)
    for i, uid in enumerate(uids):
        np.testing.assert_array_equal(by_source[i, ..., 0] > 0, sources[uid][1] > (BLOB + BACKGROUND) / 2)


def test_evaluate_reads_a_seg_back_onto_the_reference_grid(tmp_path: Path) -> None:
    series, ras = write_series(tmp_path / "in" / "scan", volume(), "oblique")
    predictor = Predictor.from_modules([ThresholdNet()], plan(_ras_spacing(ras)))
    assert infer(predictor, series, tmp_path / "seg", output_format="dicom-seg").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "seg").glob("scan*")) == ["scan.json", "scan.seg.dcm"]
    ref = tmp_path / "ref"
    ref.mkdir()
    write_image(ref / "scan.nii.gz", blob().astype(np.uint8), ras)
    result = evaluate(tmp_path / "seg", ref, labels=[1])
    assert result.exit_code == 0 and result.value("scan", 1, "dice") == 1.0
    shifted = ras.copy()
    shifted[:3, 3] += 0.4  # a reference on another grid: the SEG frames are not on its voxels
    write_image(ref / "scan.nii.gz", blob().astype(np.uint8), shifted)
    failed = evaluate(tmp_path / "seg", ref, labels=[1])
    assert failed.exit_code == 3 and "does not lie on the reference grid" in str(failed.failures)


def test_series_without_seg_tags_is_refused_and_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    series, ras = write_series(
        tmp_path / "in" / "scan", volume(), "axial", drop=("FrameOfReferenceUID", "StudyInstanceUID")
    )
    run = save_run(tmp_path / "run", plan_dict=plan(_ras_spacing(ras)))
    out = tmp_path / "out"
    assert (
        main(
            [
                "infer",
                "--model",
                str(run),
                "--input",
                str(series),
                "--output",
                str(out),
                "--output-format",
                "both",
                "--no-progress",
            ]
        )
        == 3
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and "lacks tags a DICOM-SEG needs" in err[0]
        and "StudyInstanceUID" in err[0]
        and "FrameOfReferenceUID" in err[0]
    )
    assert sorted(p.name for p in out.iterdir() if p.name != "report.json" and not p.name.startswith(".medgn")) == []
    assert json.loads((out / "report.json").read_text())["cases"][0]["status"] == "failed"
    # The same series to NIfTI alone needs none of those tags; by default (no format asked for)
    # the mask is written and the sidecar says why there is no SEG.
    assert (
        main(
            [
                "infer",
                "--model",
                str(run),
                "--input",
                str(series),
                "--output",
                str(tmp_path / "nii"),
                "--output-format",
                "nifti",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (tmp_path / "nii" / "scan.nii.gz").is_file() and not (tmp_path / "nii" / "scan.seg.dcm").exists()
    assert (
        main(
            ["infer", "--model", str(run), "--input", str(series), "--output", str(tmp_path / "auto"), "--no-progress"]
        )
        == 0
    )
    assert (tmp_path / "auto" / "scan.nii.gz").is_file() and not (tmp_path / "auto" / "scan.seg.dcm").exists()
    assert "no DICOM-SEG written" in json.loads((tmp_path / "auto" / "scan.json").read_text())["warnings"][0]


def test_dicom_seg_for_a_nifti_input_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "in").mkdir()
    image = write_image(tmp_path / "in" / "scan.nii.gz", volume().astype(np.float32), np.diag([0.8, 1.0, 1.25, 1.0]))
    run = save_run(tmp_path / "run")
    assert (
        main(
            [
                "infer",
                "--model",
                str(run),
                "--input",
                str(image),
                "--output",
                str(tmp_path / "out"),
                "--output-format",
                "dicom-seg",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "a DICOM-SEG needs a DICOM series input" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_non_consecutive_label_values_read_back_as_themselves(tmp_path: Path) -> None:
    """Segments are numbered 1, 2, ...; the Tracking ID carries the label value (0, 1, 7 -> 1, 7)."""
    from medgn.data.dicom_seg import read_seg_on_grid, seg_sources, write_dicom_seg
    from medgn.data.io import read_volume

    series, _ = write_series(tmp_path / "in" / "scan", volume(), "oblique")
    reference = read_volume(series)
    mask = np.zeros(reference.shape, dtype=np.int64)
    inside = blob()
    mask[inside] = 7
    low_y = np.zeros_like(inside)
    low_y[:, :5] = True
    mask[inside & low_y] = 1  # both values present
    assert set(np.unique(mask).tolist()) == {0, 1, 7}
    out = write_dicom_seg(
        mask, reference, seg_sources(reference), [0, 1, 7], {1: "vessel", 7: "tumour"}, tmp_path / "scan.seg.dcm"
    )
    ds = pydicom.dcmread(out)
    assert [int(s.SegmentNumber) for s in ds.SegmentSequence] == [1, 2]
    assert [str(s.TrackingID) for s in ds.SegmentSequence] == ["label value 1", "label value 7"]
    assert [str(s.SegmentLabel) for s in ds.SegmentSequence] == ["vessel", "tumour"]
    back = read_seg_on_grid(out, reference.shape, reference.affine)
    assert set(np.unique(back).tolist()) == {0, 1, 7}
    np.testing.assert_array_equal(back, mask)
    # A SEG from elsewhere (no medgn Tracking IDs) reads back as its segment numbers.
    for item in ds.SegmentSequence:
        del item.TrackingID
        del item.TrackingUID
    ds.save_as(tmp_path / "foreign.seg.dcm")
    foreign = read_seg_on_grid(tmp_path / "foreign.seg.dcm", reference.shape, reference.affine)
    np.testing.assert_array_equal(foreign, np.where(mask == 7, 2, mask))


ANONYMISED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
    "AccessionNumber", "ReferringPhysicianName",
)  # fmt: skip


def _infer(run: Path, series: Path, out: Path, *extra: str) -> int:
    argv = ["infer", "--model", str(run), "--input", str(series), "--output", str(out), "--no-progress", *extra]
    return main(argv)


def test_anonymised_series_without_patient_and_study_tags_gets_its_seg(tmp_path: Path) -> None:
    """DICOM lets these Type 2 tags be empty; anonymisers often drop them: the SEG has them empty."""
    from medgn.data.dicom_seg import read_seg_on_grid
    from medgn.data.io import read_volume

    series, ras = write_series(tmp_path / "in" / "scan", volume(), "axial", drop=ANONYMISED)
    run = save_run(tmp_path / "run", plan_dict=plan(_ras_spacing(ras)))
    assert _infer(run, series, tmp_path / "out") == 0
    seg = pydicom.dcmread(tmp_path / "out" / "scan.seg.dcm")
    assert seg.PatientID == "" and str(seg.PatientName) == ""
    reference = read_volume(series)
    mask = read_volume(tmp_path / "out" / "scan.nii.gz", label=True).array
    np.testing.assert_array_equal(
        read_seg_on_grid(tmp_path / "out" / "scan.seg.dcm", reference.shape, reference.affine), mask
    )
    assert json.loads((tmp_path / "out" / "scan.json").read_text())["warnings"] == []


def test_a_series_highdicom_refuses_keeps_its_nifti_by_default_and_fails_when_a_seg_is_asked_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def two_names(ds: Dataset, k: int) -> None:
        ds.PatientName = ["Doe^A", "Roe^B"]  # a multi-valued patient name: highdicom refuses to copy it

    series, ras = write_series(tmp_path / "in" / "scan", volume(), "axial", mutate=two_names)
    run = save_run(tmp_path / "run", plan_dict=plan(_ras_spacing(ras)))
    capsys.readouterr()
    assert _infer(run, series, tmp_path / "auto") == 0
    err = capsys.readouterr().err.strip().splitlines()  # the sidecar's warning is on the terminal too
    assert len(err) == 1 and err[0].startswith("medgn: warning: case scan: no DICOM-SEG written"), err
    assert (tmp_path / "auto" / "scan.nii.gz").is_file() and not (tmp_path / "auto" / "scan.seg.dcm").exists()
    warning = json.loads((tmp_path / "auto" / "scan.json").read_text())["warnings"][0]
    assert "no DICOM-SEG written" in warning and "cannot build a DICOM-SEG" in warning
    assert _infer(run, series, tmp_path / "seg", "--output-format", "dicom-seg") == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot build a DICOM-SEG from this series" in err[0], err
    assert sorted(p.name for p in (tmp_path / "seg").iterdir()) == ["report.json"]


def _shift(dk: int, mm: float) -> Callable[[Dataset, int], None]:
    def mutate(ds: Dataset, k: int) -> None:
        if k >= dk:
            ds.ImagePositionPatient = [ds.ImagePositionPatient[0] + mm * (k - dk + 1), *ds.ImagePositionPatient[1:]]

    return mutate


def _set_on(k0: int, tag: str, value: object) -> Callable[[Dataset, int], None]:
    def mutate(ds: Dataset, k: int) -> None:
        if k == k0:
            setattr(ds, tag, value)

    return mutate


def _raw_on(k0: int, tag: int, text: bytes) -> Callable[[Dataset, int], None]:
    """Slice k0's DS tag written as these bytes (pydicom would refuse to set them as a value)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    def mutate(ds: Dataset, k: int) -> None:
        if k == k0:
            ds[tag] = RawDataElement(Tag(tag), "DS", len(text), text, 0, False, True)

    return mutate


BAD_GEOMETRY = [
    ("ipp_text", {"mutate": _raw_on(3, 0x00200032, b"abc\\def\\ghi ")}, "invalid ImagePositionPatient"),
    ("ipp_nan", {"mutate": _raw_on(2, 0x00200032, b"nan\\0\\1 ")}, "invalid ImagePositionPatient"),
    ("ipp_two", {"mutate": _raw_on(2, 0x00200032, b"0\\1 ")}, "invalid ImagePositionPatient"),
    ("no_spacing", {"drop": ("PixelSpacing",)}, "no PixelSpacing"),
    ("zero_spacing", {"mutate": lambda ds, k: setattr(ds, "PixelSpacing", [0, 0.8])}, "invalid PixelSpacing"),
    ("no_orientation", {"drop": ("ImageOrientationPatient",)}, "no ImageOrientationPatient"),
    (
        "skewed",
        {"mutate": lambda ds, k: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0.7071, 0.7071, 0])},
        "invalid ImageOrientationPatient",
    ),
    (
        "mixed_orientation",
        {"mutate": _set_on(4, "ImageOrientationPatient", [1, 0, 0, 0, 0, -1])},
        "differ in orientation",
    ),
    ("gantry_tilt", {"mutate": _shift(0, 0.5)}, "shifted within its plane"),
    ("short_pixels", {"mutate": _set_on(4, "PixelData", bytes(100))}, "PixelData is shorter than its Rows x Columns"),
    ("one_slice_moved", {"mutate": _set_on(5, "ImagePositionPatient", [-15.5, 13.25, 40.0 + 5 * SLICE_MM])}, "shifted"),
]


@pytest.mark.parametrize(("name", "how", "words"), BAD_GEOMETRY, ids=[b[0] for b in BAD_GEOMETRY])
def test_series_geometry_that_readers_would_guess_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, how: dict, words: str
) -> None:
    """ITK reads a missing PixelSpacing as 1 mm, an invalid orientation as axial and stacks tilted
    or shifted slices as straight: each is refused with one line naming a slice, and nothing written."""
    series, ras = write_series(tmp_path / "in" / "scan", volume(), "axial", **how)
    run = save_run(tmp_path / "run", plan_dict=plan(_ras_spacing(ras)))
    capsys.readouterr()
    assert _infer(run, series, tmp_path / "out", "--output-format", "nifti") == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and str(series) in err[0], err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json"]


def test_a_slice_file_cut_inside_its_pixel_data_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file that ends inside its PixelData: GDCM leaves it out of the series, which then has a gap."""
    series, ras = write_series(tmp_path / "in" / "scan", volume(), "axial")
    cut = series / "004.dcm"
    cut.write_bytes(cut.read_bytes()[:-300])
    run = save_run(tmp_path / "run", plan_dict=plan(_ras_spacing(ras)))
    capsys.readouterr()
    assert _infer(run, series, tmp_path / "out", "--output-format", "nifti") == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(series) in err[0] and "missing or uneven slices" in err[0], err


def _raw_text(tag: int, vr: str, text: bytes) -> Callable[[Dataset, int], None]:
    """Every slice's ``tag`` written as these bytes (pydicom would refuse to set them as a value)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    def mutate(ds: Dataset, k: int) -> None:
        ds[tag] = RawDataElement(Tag(tag), vr, len(text), text, 0, False, True)

    return mutate


def _same_sop_uid(ds: Dataset, k: int) -> None:
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"


SEG_REFUSED = [
    ("patient_sex", _raw_text(0x00100040, "CS", b"male"), "cannot build a DICOM-SEG", "PatientSex"),
    ("study_date", _raw_text(0x00080020, "DA", b"2020-01-01"), "cannot build a DICOM-SEG", "2020-01-01"),
    ("study_time", _raw_text(0x00080030, "TM", b"25:61:00"), "cannot build a DICOM-SEG", "25:61:00"),
    ("repeated_sop_uid", _same_sop_uid, "SOPInstanceUID(s) repeat across the series' slices", "1.2.3.4.5"),
]


@pytest.mark.parametrize(("name", "mutate", "words", "value"), SEG_REFUSED, ids=[s[0] for s in SEG_REFUSED])
def test_a_series_that_cannot_carry_a_seg_fails_before_any_mask_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, mutate: Callable, words: str, value: str
) -> None:
    """Values highdicom refuses, and slices that share one SOPInstanceUID (a SEG frame names its source
    slice by that UID alone), fail the case before prediction: no NIfTI mask published beside a failed
    SEG, no sidecar left saying the case is running. Without a SEG asked for, the NIfTI mask is written."""
    series, ras = write_series(tmp_path / "in" / "scan", volume(), "axial", mutate=mutate)
    run = save_run(tmp_path / "run", plan_dict=plan(_ras_spacing(ras)))
    capsys.readouterr()
    assert _infer(run, series, tmp_path / "both", "--output-format", "both") == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and value in err[0] and str(series) in err[0], err
    assert sorted(p.name for p in (tmp_path / "both").iterdir()) == ["report.json"]
    assert _infer(run, series, tmp_path / "auto") == 0
    assert (tmp_path / "auto" / "scan.nii.gz").is_file() and not (tmp_path / "auto" / "scan.seg.dcm").exists()
    assert words in json.loads((tmp_path / "auto" / "scan.json").read_text())["warnings"][0]


@pytest.mark.parametrize("kind", ["fifo", "dangling_link"])
def test_a_series_folder_with_an_entry_no_reader_lists_past_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    """GDCM stops listing a folder at a FIFO or a link that leads nowhere: the slices after it would
    silently be missing from the series, so such a folder is refused naming the entry."""
    series, ras = write_series(tmp_path / "in" / "scan", volume(), "axial")
    odd = series / "005a.dcm"  # sorts among the slices
    if kind == "fifo":
        os.mkfifo(odd)
    else:
        odd.symlink_to(tmp_path / "gone.dcm")
    run = save_run(tmp_path / "run", plan_dict=plan(_ras_spacing(ras)))
    capsys.readouterr()
    assert _infer(run, series, tmp_path / "out", "--output-format", "nifti") == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "005a.dcm" in err[0] and "no DICOM reader can list past" in err[0], err
    assert not (tmp_path / "out" / "scan.nii.gz").exists()


def test_label_names_and_patient_names_keep_their_text(tmp_path: Path) -> None:
    """A backslash (DICOM's value separator) or a control character in a label name is replaced, not
    split into two values; names outside Latin-1, and a Latin-1 patient name, read back as written."""
    from medgn.data.dicom_seg import seg_sources, write_dicom_seg
    from medgn.data.io import read_volume

    def latin1_patient(ds: Dataset, k: int) -> None:
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "Müller^Jürgen"

    series, _ = write_series(tmp_path / "in" / "scan", volume(), "axial", mutate=latin1_patient)
    reference = read_volume(series)
    mask = np.zeros(reference.shape, dtype=np.int64)
    mask[blob()] = 1
    mask[:2, :2, :2] = 2
    names = {1: "left\\right", 2: "肝臓 liver\t2"}
    out = write_dicom_seg(mask, reference, seg_sources(reference), [0, 1, 2], names, tmp_path / "scan.seg.dcm")
    ds = pydicom.dcmread(out)
    assert [str(s.SegmentLabel) for s in ds.SegmentSequence] == ["left_right", "肝臓 liver_2"]
    assert str(ds.PatientName) == "Müller^Jürgen"


def test_a_dicom_seg_rerun_with_other_settings_names_the_settings(tmp_path: Path) -> None:
    # The refusal said the NIfTI name "would share" the SEG's record, though the run writes the SEG.
    series, ras = write_series(tmp_path / "in" / "scan", volume(), "oblique")
    predictor = Predictor.from_modules([ThresholdNet()], plan(_ras_spacing(ras)))
    assert infer(predictor, series, tmp_path / "seg", output_format="dicom-seg").exit_code == 0
    report = infer(predictor, series, tmp_path / "seg", output_format="dicom-seg", save_probabilities=True)
    (case,) = report.cases
    assert case.code == 2 and "outputs exist from a different model, settings or input" in case.message, case.message


def test_a_dicom_series_rerun_naming_its_default_format_is_the_same_run(tmp_path: Path) -> None:
    # A series gets a SEG and a NIfTI mask by default; `--output-format both` asks for just that.
    series, ras = write_series(tmp_path / "in" / "scan", volume(), "oblique")
    predictor = Predictor.from_modules([ThresholdNet()], plan(_ras_spacing(ras)))
    assert infer(predictor, series, tmp_path / "seg").exit_code == 0
    (case,) = infer(predictor, series, tmp_path / "seg", output_format="both").cases
    assert case.status == "skipped", case.message
    (case,) = infer(predictor, series, tmp_path / "seg", output_format="nifti").cases
    assert case.code == 2, case.message  # the SEG is not written: another run


def test_a_seg_alone_with_overwrite_removes_the_earlier_mask_only_as_written(tmp_path: Path) -> None:
    # `both`, then `dicom-seg --overwrite`: the earlier NIfTI mask stayed beside the new SEG, recorded
    # nowhere, and `medgn evaluate` on the folder scored it. Removed now, unless changed since.
    series, ras = write_series(tmp_path / "in" / "scan", volume(), "oblique")
    predictor = Predictor.from_modules([ThresholdNet()], plan(_ras_spacing(ras)))
    out = tmp_path / "seg"
    assert infer(predictor, series, out).exit_code == 0
    assert {"scan.nii.gz", "scan.seg.dcm"} <= {p.name for p in out.iterdir()}
    assert infer(predictor, series, out, output_format="dicom-seg", overwrite=True).exit_code == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "report.json",
        "scan.json",
        "scan.seg.dcm",
    ]
    assert json.loads((out / "scan.json").read_text())["outputs"] == ["scan.seg.dcm"]
    # A mask corrected by hand after the `both` run is the user's: kept.
    assert infer(predictor, series, out, overwrite=True).exit_code == 0
    edited = bytearray((out / "scan.nii.gz").read_bytes())
    edited[-1] ^= 1
    (out / "scan.nii.gz").write_bytes(bytes(edited))
    assert infer(predictor, series, out, output_format="dicom-seg", overwrite=True).exit_code == 0
    assert (out / "scan.nii.gz").read_bytes() == bytes(edited)
