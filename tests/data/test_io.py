"""Tests for medgn.data.io and medgn.data.preflight: bad inputs refused, geometry kept on write."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medgn.data.io import Limits, geometry_diff, read_header, read_volume, write_mask, write_volume
from medgn.errors import InputDataError, MedgnError, UsageError
from tests.data.conftest import make_nifti, patch_nifti


def _raises(path: Path, code: int, words: str, **kwargs: object) -> MedgnError:
    with pytest.raises(MedgnError) as info:
        read_volume(path, **kwargs)  # type: ignore[arg-type]
    assert info.value.code == code, info.value
    assert str(path) in str(info.value) and words in str(info.value)
    assert "\n" not in info.value.one_line()
    return info.value


def test_unreadable_files(tmp_path: Path, blob: np.ndarray) -> None:
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    _raises(empty, 3, "empty")
    noise = tmp_path / "noise.nii.gz"
    noise.write_bytes(np.random.default_rng(0).bytes(3000))
    _raises(noise, 3, "gzip")
    plain = make_nifti(tmp_path / "plain.nii", blob)
    renamed = tmp_path / "renamed.nii.gz"
    os.rename(plain, renamed)
    _raises(renamed, 3, "gzip")
    _raises(tmp_path / "missing.nii.gz", 3, "not found")
    (tmp_path / "x.png").write_bytes(b"png")
    _raises(tmp_path / "x.png", 3, "unsupported file type")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_truncated_file_caught_by_header_check(tmp_path: Path, blob: np.ndarray, suffix: str) -> None:
    path = make_nifti(tmp_path / f"cut{suffix}", blob)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputDataError, match="truncated"):
        read_header(path)


@pytest.mark.parametrize(("size", "words"), [(30000, "dimension above the limit"), (4000, "too many voxels")])
def test_huge_header_fails_before_allocation(tmp_path: Path, size: int, words: str) -> None:
    header = nib.Nifti1Header()
    header.set_data_shape((size, size, size))
    header.set_data_dtype(np.float32)
    header.set_sform(np.eye(4), code=1)
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 64))
    assert path.stat().st_size < 1000
    err = _raises(path, 5, words)
    assert "raise it with --max-" in str(err)


def test_real_volume_above_voxel_limit(tmp_path: Path, blob: np.ndarray) -> None:
    path = make_nifti(tmp_path / "a.nii.gz", blob)
    _raises(path, 5, "too many voxels", limits=Limits(max_voxels=100))
    assert read_volume(path, limits=Limits(max_voxels=blob.size)).shape == blob.shape


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("pixdim", (1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0), "spacing"),
        ("pixdim", (1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0), "spacing"),
        ("pixdim", (1.0, float("nan"), 1.0, 1.0, 1.0, 1.0, 1.0, 1.0), "spacing"),
        ("srow_x", (0.0, 0.0, 0.0, 0.0), "singular"),
        ("srow_x", (float("nan"), 0.0, 0.0, 0.0), "not finite"),
        ("datatype", 32, "unsupported data type"),  # complex64 (bitpix stays wrong on purpose)
        ("datatype", 1, "data type"),  # binary/bool
    ],
)
def test_bad_header_fields(
    tmp_path: Path, blob: np.ndarray, field: str, value: tuple[float, ...] | float, words: str
) -> None:
    path = patch_nifti(make_nifti(tmp_path / "bad.nii.gz", blob), field, value)
    _raises(path, 3, words)


def test_no_orientation_codes(tmp_path: Path, blob: np.ndarray) -> None:
    path = make_nifti(tmp_path / "noorient.nii.gz", blob)
    patch_nifti(path, "qform_code", 0)
    patch_nifti(path, "sform_code", 0)
    _raises(path, 3, "no orientation")


@pytest.mark.parametrize("shape", [(8, 7), (8, 7, 6, 2), (8, 7, 6, 1, 2)])
def test_not_3d(tmp_path: Path, shape: tuple[int, ...]) -> None:
    path = make_nifti(tmp_path / "nd.nii.gz", np.zeros(shape, np.float32))
    _raises(path, 3, "expected 3D, got shape")


def test_singleton_fourth_dim_is_squeezed(tmp_path: Path, blob: np.ndarray) -> None:
    path = make_nifti(tmp_path / "4d.nii.gz", blob[..., None])
    np.testing.assert_array_equal(read_volume(path).array, blob)


def test_rgb_and_nan(tmp_path: Path, blob: np.ndarray) -> None:
    rgb = np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    _raises(make_nifti(tmp_path / "rgb.nii.gz", rgb), 3, "unsupported data type")
    blob[0, 0, :3] = [np.nan, np.inf, -np.inf]
    _raises(make_nifti(tmp_path / "nan.nii.gz", blob), 3, "3 NaN/Inf voxels")


def test_labels_are_integers(tmp_path: Path, blob: np.ndarray) -> None:
    labels = np.zeros((8, 7, 6), np.uint8)
    labels[2:4, 2:4, 2:4] = 7
    labels[0, 0, 0] = 9
    path = make_nifti(tmp_path / "lab.nii.gz", labels)
    vol = read_volume(path, label=True, label_values=[0, 1, 7, 8, 9])
    assert vol.array.dtype == np.int32
    np.testing.assert_array_equal(vol.array, labels)
    err = _raises(path, 3, "outside the declared set", label=True, label_values=[0, 1])
    assert "[7, 9]" in str(err)
    _raises(make_nifti(tmp_path / "img.nii.gz", blob), 3, "non-integer", label=True)


def test_scaled_integral_label_is_read_exactly(tmp_path: Path) -> None:
    labels = np.arange(6 * 5 * 4).reshape(6, 5, 4) % 5
    img = nib.Nifti1Image(labels.astype(np.int16), np.eye(4))
    img.header.set_sform(np.eye(4), code=1)
    img.header.set_slope_inter(2.0, 0.0)  # stored/2: the reader applies the scale exactly
    nib.save(img, str(tmp_path / "s.nii.gz"))
    out = read_volume(tmp_path / "s.nii.gz", label=True).array
    assert out.dtype == np.int32 and set(np.unique(out).tolist()) <= {0, 2, 4, 6, 8}


def _oblique(spacing: tuple[float, float, float]) -> np.ndarray:
    angle = 0.3
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing) @ np.diag([-1, 1, -1])
    affine[:3, 3] = [12.5, -30.25, 7.0]
    return affine


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_write_mask_reproduces_geometry(tmp_path: Path, blob: np.ndarray, suffix: str) -> None:
    affine = _oblique((0.7, 1.3, 3.1))
    src = make_nifti(tmp_path / "ref.nii.gz", blob, affine)
    if suffix != ".nii.gz":  # an ITK-format reference, written by SimpleITK itself
        ref0 = read_volume(src)
        src = write_volume(blob, ref0, tmp_path / f"ref{suffix}")
    ref = read_volume(src)
    np.testing.assert_allclose(ref.affine, affine, atol=1e-5)
    np.testing.assert_allclose(ref.array, blob)
    mask = (blob > 30).astype(np.int64)
    mask[0, 0, 0] = 300  # forces uint16
    out = write_mask(mask, ref, tmp_path / f"mask{suffix}")
    back = read_volume(out, label=True)
    assert geometry_diff(ref, back) == []
    np.testing.assert_array_equal(back.array, mask)
    if suffix == ".nii.gz":
        header = nib.load(str(out)).header
        assert header.get_data_dtype() == np.uint16
        assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 1)
    with pytest.raises(UsageError, match="output exists"):
        write_mask(mask, ref, out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".medgn-tmp")] == []


def test_large_header_extension_is_read_and_not_copied_to_the_mask(tmp_path: Path, blob: np.ndarray) -> None:
    """A valid NIfTI with a 400-byte extension (AFNI and JSON sidecars are this size) is read."""
    img = nib.Nifti1Image(blob, _oblique((0.7, 1.3, 3.1)))
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"x" * 392))  # code 6: a comment
    nib.save(img, str(tmp_path / "ext.nii.gz"))
    assert read_header(tmp_path / "ext.nii.gz").meta["nifti_header"]["vox_offset"] > 540
    ref = read_volume(tmp_path / "ext.nii.gz")
    np.testing.assert_allclose(ref.array, blob)
    out = write_mask((blob > 30).astype(np.uint8), ref, tmp_path / "mask.nii.gz")
    back = nib.load(str(out))
    assert len(back.header.extensions) == 0
    assert geometry_diff(ref, read_volume(out, label=True)) == []


def test_write_mask_refuses_wrong_geometry_and_writes_nothing(
    tmp_path: Path, blob: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = read_volume(make_nifti(tmp_path / "ref.nii.gz", blob, spacing=(0.5, 0.5, 2.0)))
    with pytest.raises(UsageError, match="shape"):
        write_mask(np.zeros((3, 3, 3), np.uint8), ref, tmp_path / "m.nii.gz")
    import medgn.data.io as io_mod

    real = io_mod._written_geometry
    monkeypatch.setattr(
        io_mod, "_written_geometry", lambda tmp, fmt: (real(tmp, fmt)[0], real(tmp, fmt)[1] @ np.diag([1, 1, 1.001, 1]))
    )
    with pytest.raises(InputDataError, match="spacing"):
        write_mask(np.zeros(blob.shape, np.uint8), ref, tmp_path / "m.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.nii.gz"]


def test_itk_reader_matches_transposed_array(tmp_path: Path) -> None:
    zyx = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    image = sitk.GetImageFromArray(zyx)
    image.SetSpacing((0.5, 0.75, 2.0))
    image.SetOrigin((1.0, 2.0, 3.0))
    sitk.WriteImage(image, str(tmp_path / "a.nrrd"))
    vol = read_volume(tmp_path / "a.nrrd")
    np.testing.assert_array_equal(vol.array, zyx.transpose(2, 1, 0))
    # LPS origin (1, 2, 3) is RAS (-1, -2, 3); identity LPS direction flips x and y in RAS.
    np.testing.assert_allclose(vol.affine, [[-0.5, 0, 0, -1], [0, -0.75, 0, -2], [0, 0, 2, 3], [0, 0, 0, 1]])


def _dicom_series(folder: Path, series_uid: str, n: int = 5, skip: int | None = None, z0: float = 0.0) -> None:
    """Write an n-slice int16 CT series (2 mm slices) with SimpleITK; ``skip`` drops one slice."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = sitk.GetImageFromArray(np.arange(n * 6 * 7, dtype=np.int16).reshape(n, 6, 7))
    volume.SetSpacing((0.5, 0.75, 2.0))
    volume.SetOrigin((10.0, 20.0, z0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for i in range(n):
        if i == skip:
            continue
        image = volume[:, :, i]
        position = volume.TransformIndexToPhysicalPoint((0, 0, i))
        tags = {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid,
            "0020|0013": str(i + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0008|0018": f"{series_uid}.{i + 1}",
            "0028|0030": "0.75\\0.5",
            "0018|0050": "2.0",
        }
        for key, value in tags.items():
            image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{series_uid[-3:]}_{i:03d}.dcm"))
        writer.Execute(image)


def test_dicom_series_read_and_refused(tmp_path: Path) -> None:
    _dicom_series(tmp_path / "ok", "1.2.826.0.1.3680043.2.1125.101")
    vol = read_volume(tmp_path / "ok")
    assert vol.format == "dicom" and vol.shape == (7, 6, 5)
    np.testing.assert_allclose(vol.spacing, (0.5, 0.75, 2.0), atol=1e-5)
    np.testing.assert_allclose(vol.affine[:3, 3], (-10.0, -20.0, 0.0), atol=1e-5)  # LPS origin -> RAS
    np.testing.assert_array_equal(vol.array, np.arange(5 * 6 * 7).reshape(5, 6, 7).transpose(2, 1, 0))
    mask = write_mask((vol.array > 100).astype(np.uint8), vol, tmp_path / "dicom_mask.nii.gz")
    assert geometry_diff(vol, read_volume(mask, label=True)) == []
    from medgn.data.inputs import find_inputs

    assert [(c.case_id, c.images) for c in find_inputs(tmp_path / "ok")] == [("ok", (tmp_path / "ok",))]
    _dicom_series(tmp_path / "gap", "1.2.826.0.1.3680043.2.1125.102", n=6, skip=3)
    _raises(tmp_path / "gap", 3, "missing or uneven slices: 4.000->8.000 mm")
    _dicom_series(tmp_path / "two", "1.2.826.0.1.3680043.2.1125.103")
    _dicom_series(tmp_path / "two", "1.2.826.0.1.3680043.2.1125.104", z0=50.0)
    err = _raises(tmp_path / "two", 3, "2 DICOM series")
    assert "1125.103" in str(err) and "1125.104" in str(err)


@pytest.mark.data
def test_real_samples_geometry(shared_data: Path) -> None:
    samples = shared_data / "samples"
    ct = read_volume(samples / "ct_abdomen_small.nii.gz")
    assert ct.spacing == pytest.approx((3.0, 3.0, 3.0)) and nib.aff2axcodes(ct.affine) == ("R", "A", "S")
    for name, spacing in (("mr_brain_tumor", (0.78125, 0.78125, 6.5)), ("mr_prostate_phantom", (0.5, 0.5, 3.0))):
        image = read_volume(samples / f"{name}.nrrd")
        label = read_volume(samples / f"{name}_label.nrrd", label=True)
        assert image.spacing == pytest.approx(spacing, abs=1e-4) and geometry_diff(image, label) == []
        itk = sitk.ReadImage(str(samples / f"{name}.nrrd"))
        # Voxel (1, 2, 3) through our RAS affine equals ITK's LPS point with x and y negated.
        lps = itk.TransformContinuousIndexToPhysicalPoint((1.0, 2.0, 3.0))
        np.testing.assert_allclose((image.affine @ [1, 2, 3, 1])[:3], (-lps[0], -lps[1], lps[2]), atol=1e-4)
    assert sorted(np.unique(read_volume(samples / "mr_prostate_phantom_label.nrrd", label=True).array).tolist()) == [
        0,
        1,
        7,
        8,
        9,
    ]
    dicom = read_volume(samples / "ct_dicom_series")
    assert dicom.shape == (512, 512, 20) and dicom.spacing == pytest.approx((0.9765625, 0.9765625, 2.0), abs=1e-4)
    assert nib.aff2axcodes(dicom.affine) == ("L", "P", "S") and dicom.array.min() < -500  # Hounsfield units


def test_a_decoder_repeating_itself_is_quoted_once() -> None:
    from medgn.data.native import itk_reason

    native = ["Stream too short"] * 70 + ["", "Not a JPEG file"]
    assert itk_reason(RuntimeError("x"), native) == "Stream too short Not a JPEG file (and 69 repeated lines)"
    assert itk_reason(RuntimeError("ITK ERROR: ImageIO(0x1): bad file"), []) == "bad file"


def test_a_nifti_mask_of_an_nrrd_scan_far_from_the_origin_is_written(tmp_path: Path, blob: np.ndarray) -> None:
    """NIfTI keeps its affine in float32: a CT table position of -1123.4 mm comes back 2.4e-5 mm off.

    The written-geometry check refused that mask (and evaluate an NRRD reference against its NIfTI
    prediction) with two origins printed alike; a real difference is still named, with its size.
    """
    affine = np.array([[-0.7, 0, 0, 180.3], [0, -0.7, 0, 200.7], [0, 0, 2.5, -1123.4], [0, 0, 0, 1.0]])
    src = make_nifti(tmp_path / "src.nii.gz", blob, affine)
    ref = write_volume(blob, read_volume(src), tmp_path / "ref.nrrd")  # the exact double values
    ref_vol = read_volume(ref)
    ref_vol.affine[:] = affine  # as a DICOM series or an NRRD header gives them
    out = write_mask((blob > 30).astype(np.uint8), ref_vol, tmp_path / "mask.nii.gz")
    back = read_volume(out, label=True)
    assert 1e-5 < abs(back.affine[2, 3] - affine[2, 3]) < 1e-4  # float32's rounding, within tolerance
    assert geometry_diff(ref_vol, back) == []
    moved = back.affine.copy()
    moved[2, 3] += 0.01
    (diff,) = geometry_diff(ref_vol, SimpleNamespace(shape=back.shape, affine=moved))
    assert diff.startswith("origin (180.3, 200.7, -1123.4) vs (180.3, 200.7, -1123.39) (off by up to 0.00998 mm)")
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0]) @ affine
    assert "-0," not in " ".join(geometry_diff(SimpleNamespace(shape=blob.shape, affine=flipped), ref_vol))
