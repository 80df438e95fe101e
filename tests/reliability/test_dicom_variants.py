"""DICOM series as real exports write them: per-slice rescaling, mixed signedness, MONOCHROME1, a
single slice, a series split across folders, rounded positions. Each was read silently wrong (or lost
its DICOM-SEG) before; each is read right or refused naming the file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medgn.data.dicom_seg import seg_sources
from medgn.data.io import read_volume
from medgn.errors import InputDataError
from tests.reliability.conftest import dicom_series

SHAPE = (8, 8, 6)


def _series(folder: Path) -> tuple[Path, list[Path], np.ndarray]:
    stored = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 97 + 3).astype(np.int16)
    dicom_series(folder, stored)
    return folder, sorted(folder.glob("*.dcm")), stored


def test_each_slice_is_rescaled_by_its_own_slope_and_intercept(tmp_path: Path) -> None:
    """The first slice (slope 1) fixed an integer type: 1.25 x 131 came out 163, 0.01 x 139 came out 1."""
    folder, files, stored = _series(tmp_path / "s")
    for k, slope, intercept in ((2, 1.25, 0.0), (4, 0.01, 0.5)):
        ds = pydicom.dcmread(files[k])
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.save_as(files[k])
    got = read_volume(folder).array
    want = stored.astype(np.float32)
    want[:, :, 2] *= 1.25
    want[:, :, 4] = want[:, :, 4] * 0.01 + 0.5
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_signed_and_unsigned_slices_keep_their_values(tmp_path: Path) -> None:
    """One unsigned slice of 40000 in a signed series wrapped to -25536."""
    folder, files, stored = _series(tmp_path / "s")
    ds = pydicom.dcmread(files[3])
    ds.PixelRepresentation = 0
    unsigned = np.full((SHAPE[1], SHAPE[0]), 40000, dtype=np.uint16)
    ds.PixelData = unsigned.tobytes()
    ds.save_as(files[3])
    got = read_volume(folder).array
    assert float(got[:, :, 3].min()) == 40000.0
    np.testing.assert_array_equal(got[:, :, 0], stored[:, :, 0].astype(np.float32))


def test_monochrome1_is_refused_naming_the_slice(tmp_path: Path) -> None:
    """GDCM inverts MONOCHROME1 values: a CT slice of 114 HU was read as 1933 HU."""
    folder, files, _ = _series(tmp_path / "s")
    ds = pydicom.dcmread(files[1])
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(files[1])
    with pytest.raises(InputDataError, match="MONOCHROME1 slices are not read") as info:
        read_volume(folder)
    assert str(files[1]) in str(info.value)


def test_one_slice_takes_its_thickness_as_the_step(tmp_path: Path) -> None:
    """ITK reads a single slice as 1 mm thick whatever its tags say, so resampling stretched it."""
    folder, files, _ = _series(tmp_path / "s")
    for path in files[1:]:
        path.unlink()
    ds = pydicom.dcmread(files[0])
    ds.Modality, ds.SliceThickness = "MR", 2.5  # ITK took an MR slice's thickness for 1 mm
    if "SpacingBetweenSlices" in ds:
        del ds.SpacingBetweenSlices
    ds.save_as(files[0])
    assert read_volume(folder).spacing[2] == pytest.approx(2.5)
    ds = pydicom.dcmread(files[0])
    ds.SpacingBetweenSlices = 3.5  # wins over the thickness, as for a stack
    ds.save_as(files[0])
    assert read_volume(folder).spacing[2] == pytest.approx(3.5)


def test_a_localizer_sorting_first_is_the_slice_named(tmp_path: Path) -> None:
    """A scout image filed before the axial slices made every good slice "differ", the first one named."""
    folder, files, _ = _series(tmp_path / "s")
    ds = pydicom.dcmread(files[0])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal
    ds.InstanceNumber = 99
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.2.1125.99.1"
    localizer = folder / "000_localizer.dcm"
    ds.save_as(localizer)
    with pytest.raises(InputDataError, match="differ in orientation or pixel spacing") as info:
        read_volume(folder)
    line = str(info.value)
    assert line.startswith(f"{localizer}:") and f"as {len(files)} of {len(files) + 1} slices" in line, line


def test_a_series_that_continues_in_a_subfolder_is_refused(tmp_path: Path) -> None:
    """Half a series beside its other half in a subfolder was segmented as half a volume, exit 0."""
    folder, files, _ = _series(tmp_path / "s")
    (folder / "part2").mkdir()
    for path in files[3:]:
        shutil.move(str(path), folder / "part2" / path.name)
    with pytest.raises(InputDataError, match="continues in subfolder part2 \\(3 more files\\)"):
        read_volume(folder)
    other = dicom_series(folder / "other", np.zeros((4, 4, 2)), series_uid="1.2.826.0.1.3680043.2.1125.7")
    shutil.rmtree(folder / "part2")
    assert other.is_dir() and read_volume(folder).shape == (8, 8, 3)  # another series below is not this one's


def test_rounded_positions_still_place_every_slice_for_the_seg(tmp_path: Path) -> None:
    """Positions off by micrometres (exports round them) passed the series check but lost the SEG."""
    folder, files, _ = _series(tmp_path / "s")
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.2.1125.5"  # a SEG needs it
        if k == 2:
            ds.ImagePositionPatient = [0.004, -0.003, 4.006]  # slice 2 of a 2 mm stack, rounded
        ds.save_as(path)
    volume = read_volume(folder)
    sources = seg_sources(volume)
    assert [round(float(s.ImagePositionPatient[2])) for s in sources] == [0, 2, 4, 6, 8, 10]


def test_a_duplicate_slice_is_named_as_such(tmp_path: Path) -> None:
    """A copied slice was reported as "missing or uneven slices: 4.000->4.000 mm"."""
    folder, files, _ = _series(tmp_path / "s")
    shutil.copy(files[2], folder / "copy_of_slice.dcm")
    with pytest.raises(InputDataError, match="1 slice\\(s\\) at the position of another: .* at 4.000 mm") as info:
        read_volume(folder)
    assert "copy_of_slice.dcm" in str(info.value) and files[2].name in str(info.value)


def test_slices_of_another_size_and_multi_frame_files_are_named(tmp_path: Path) -> None:
    """A slice of other Columns was "cannot read the voxel data" naming the folder; an Enhanced
    multi-frame file was "no ImagePositionPatient"."""
    folder, files, _ = _series(tmp_path / "s")
    ds = pydicom.dcmread(files[4])
    ds.Columns = SHAPE[0] + 2
    ds.PixelData = np.zeros((SHAPE[1], SHAPE[0] + 2), dtype=np.int16).tobytes()
    ds.save_as(files[4])
    with pytest.raises(InputDataError, match="DICOM slices differ in size \\(Columns x Rows\\) \\(got 10x8") as info:
        read_volume(folder)
    assert str(files[4]) in str(info.value)
    multi, files, _ = _series(tmp_path / "m")
    for path in files[1:]:
        path.unlink()
    ds = pydicom.dcmread(files[0])
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    ds.save_as(files[0])
    with pytest.raises(InputDataError, match="multi-frame DICOM \\(2 frames in one file"):
        read_volume(multi)
