"""Inference preprocessing without MONAI: held to the MONAI pipeline the models are validated with."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from medgn.data.boxes import nonzero_box
from medgn.data.io import read_volume
from medgn.data.pipeline import infer_transforms
from medgn.data.preflight import Limits
from medgn.data.prepare import foreground_box, invert_probabilities, normalize_channel, prepare, target_grid
from medgn.errors import InputDataError, ResourceError
from tests.data.conftest import make_nifti

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _plan(target: list[float], norms: list[dict[str, Any]] | None = None) -> SimpleNamespace:
    norms = norms or [{"scheme": "zscore"}]
    return SimpleNamespace(
        label_values=[0, 1],
        normalization=norms,
        target_spacing=target,
        patch_size=(8, 8, 8),
        in_channels=len(norms),
    )


def _rotation(angle_deg: float, axis: tuple[float, float, float]) -> np.ndarray:
    a = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    t = np.deg2rad(angle_deg)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def _affine(linear: np.ndarray, origin: tuple[float, float, float] = (7.0, -4.5, 12.25)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = origin
    return affine


def _permuted(perm: tuple[int, int, int], signs: tuple[int, int, int], spacing: tuple[float, ...]) -> np.ndarray:
    linear = np.zeros((3, 3))
    for a in range(3):
        linear[perm[a], a] = signs[a] * spacing[a]
    return linear


def _image(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Smooth structure, a zero margin on some sides (cropped away) and noise: every step shows."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    array = (50 + 40 * np.sin(3 * x + 1) * np.cos(2 * y) + 10 * z + rng.normal(0, 3, shape)).astype(np.float32)
    array[:2] = 0.0
    array[:, -3:] = 0.0
    return array


GEOMETRIES = {
    "axis-aligned": (_affine(np.diag([0.8, 1.0, 1.25])), [1.0, 1.0, 1.0]),
    "flipped, permuted": (_affine(_permuted((2, 0, 1), (1, -1, -1), (0.7, 1.1, 2.5))), [1.5, 1.5, 1.5]),
    "LPS-like": (_affine(np.diag([-0.9, -0.9, 3.0])), [1.25, 1.25, 1.6]),
    "oblique": (_affine(_rotation(20, (0, 0, 1)) @ np.diag([0.8, 1.0, 1.25])), [1.1, 0.9, 1.4]),
    "oblique, tilted axis": (_affine(_rotation(35, (1, 1, 0.3)) @ np.diag([1.2, 0.6, 2.0])), [1.0, 1.0, 1.0]),
    "sheared": (_affine(np.array([[1.0, 0.15, 0.0], [0.0, 1.0, 0.1], [0.0, 0.0, 2.0]])), [1.0, 1.0, 1.5]),
    # within 1e-3 of the target on every axis: the spacing is kept and nothing is resampled
    "at the target": (_affine(np.diag([1.0004, 0.9995, 2.0])), [1.0, 1.0, 2.0]),
    "upsampled": (_affine(np.diag([2.0, 2.0, 3.0])), [0.75, 0.8, 1.1]),
}


def _write(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """NIfTI with the affine as its sform (a quaternion qform cannot hold a shear: code 0)."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_sform(affine, code=1)
    img.header.set_qform(affine, code=0)
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_prepare_equals_the_monai_pipeline(tmp_path: Path, name: str) -> None:
    affine, target = GEOMETRIES[name]
    path = _write(tmp_path / "in.nii.gz", _image((17, 14, 11)), affine)
    plan = _plan(target)
    ours = prepare([read_volume(path)], plan)
    theirs = infer_transforms(plan)({"image": [str(path)]})["image"]
    assert tuple(ours.image.shape) == tuple(theirs.shape), name
    np.testing.assert_allclose(ours.affine, np.asarray(theirs.affine), atol=1e-9)
    torch.testing.assert_close(ours.image, theirs.as_tensor().float(), atol=1e-5, rtol=0)
    assert ours.spatial_shape == (17, 14, 11)
    np.testing.assert_array_equal(ours.original_affine, np.asarray(theirs.meta["original_affine"]))


def test_multichannel_crop_and_ct_normalisation_equal_the_monai_pipeline(tmp_path: Path) -> None:
    affine = _affine(_permuted((1, 0, 2), (-1, 1, 1), (0.9, 1.3, 2.0)))
    first = _image((15, 13, 9), seed=1)
    second = np.zeros_like(first)
    second[0:4, 2:12, 1:8] = 300.0  # nonzero where the first channel's margin is zero: the box is the union
    paths = [make_nifti(tmp_path / f"c{i}.nii.gz", a, affine) for i, a in enumerate((first, second))]
    plan = _plan([1.2, 1.2, 1.2], [{"scheme": "zscore"}, {"scheme": "ct", "clip": [-100, 250], "mean": 40, "std": 80}])
    ours = prepare([read_volume(p) for p in paths], plan)
    theirs = infer_transforms(plan)({"image": [str(p) for p in paths]})["image"]
    assert tuple(ours.image.shape) == tuple(theirs.shape)
    np.testing.assert_allclose(ours.affine, np.asarray(theirs.affine), atol=1e-9)
    torch.testing.assert_close(ours.image, theirs.as_tensor().float(), atol=1e-5, rtol=0)


def test_blank_and_flat_images_keep_their_grid(tmp_path: Path) -> None:
    path = make_nifti(tmp_path / "blank.nii.gz", np.zeros((6, 7, 1), np.float32), _affine(np.diag([1.0, 1.0, 5.0])))
    plan = _plan([2.0, 2.0, 5.0])
    ours = prepare([read_volume(path)], plan)
    theirs = infer_transforms(plan)({"image": [str(path)]})["image"]
    assert tuple(ours.image.shape) == tuple(theirs.shape) == (1, 4, 4, 1)
    np.testing.assert_allclose(ours.affine, np.asarray(theirs.affine), atol=1e-9)
    assert not bool(ours.image.any())


def test_foreground_box_is_the_union_of_channels() -> None:
    image = torch.zeros(2, 8, 9, 10)
    image[0, 2, 3, 4] = 1.0
    image[1, 5, 7, 1] = -2.0
    assert foreground_box(image) == ((2, 3, 1), (6, 8, 5))
    assert foreground_box(torch.zeros(1, 3, 4, 5)) == ((0, 0, 0), (3, 4, 5))


def test_nonzero_box_is_the_smallest_box_of_true_voxels() -> None:
    mask = np.zeros((7, 8, 9), bool)
    mask[1, 6, 2] = mask[4, 2, 8] = True
    assert nonzero_box(mask) == (slice(1, 5), slice(2, 7), slice(2, 9))
    assert nonzero_box(np.zeros((3, 4, 5), bool)) is None
    assert nonzero_box(np.eye(4, dtype=bool)[1:3]) == (slice(0, 2), slice(1, 3))  # any dimension


def test_target_grid_covers_the_input_at_the_target_spacing() -> None:
    shape, affine = target_grid((10, 20, 5), _affine(np.diag([1.0, 0.5, 4.0])), [2.0, 1.0, 1.0])
    assert shape == (6, 10, 17)  # (n - 1) * old / new + 1, rounded half to even (5.5, 10.5, 17)
    np.testing.assert_allclose(np.diag(affine)[:3], [2.0, 1.0, 1.0])
    np.testing.assert_allclose(affine[:3, 3], [7.0, -4.5, 12.25])  # starts at the first voxel centre


def test_prepare_refuses_a_channel_count_other_than_the_plans(tmp_path: Path) -> None:
    path = make_nifti(tmp_path / "in.nii.gz", _image((8, 8, 8)), np.eye(4))
    with pytest.raises(InputDataError, match="channel count differs from the plan"):
        prepare([read_volume(path)], _plan([1.0, 1.0, 1.0], [{"scheme": "zscore"}] * 2))


def test_prepare_checks_the_workload_before_resampling(tmp_path: Path) -> None:
    path = make_nifti(tmp_path / "in.nii.gz", _image((16, 16, 16)), np.eye(4))
    with pytest.raises(ResourceError, match="in.nii.gz"):
        prepare([read_volume(path)], _plan([0.1, 0.1, 0.1]), Limits(max_resampled_voxels=1_000_000))


def test_prediction_inverts_like_the_monai_dict(tmp_path: Path) -> None:
    affine, target = GEOMETRIES["oblique, tilted axis"]
    path = make_nifti(tmp_path / "in.nii.gz", _image((17, 14, 11)), affine)
    plan = _plan(target)
    ours = prepare([read_volume(path)], plan)
    theirs = infer_transforms(plan)({"image": [str(path)]})
    probs = torch.softmax(torch.randn(3, *ours.image.shape[1:], generator=torch.Generator().manual_seed(0)), 0)
    back = invert_probabilities(probs, ours)
    assert tuple(back.shape) == (3, 17, 14, 11)
    torch.testing.assert_close(back, invert_probabilities(probs, theirs), atol=1e-6, rtol=0)


def _mha(path: Path, array: np.ndarray, spacing: tuple[float, float, float]) -> Path:
    """An MHA file: float64 spacing in its header (NIfTI's pixdim is float32)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize(("spacing", "target"), [(0.999, 1.0), (0.751, 0.75), (0.625 - 1e-3, 0.625), (1.0011, 1.0)])
def test_spacing_at_the_tolerance_boundary_is_decided_as_monai_decides(
    tmp_path: Path, spacing: float, target: float
) -> None:
    # |current - target| <= 1e-3 and target - 1e-3 <= current <= target + 1e-3 round differently
    # exactly at the boundary; a float64 header (MHA, NRRD, DICOM) can sit on it.
    path = _mha(tmp_path / "in.mha", _image((40, 12, 10)), (spacing, spacing, spacing))
    plan = _plan([target] * 3)
    ours = prepare([read_volume(path)], plan)
    theirs = infer_transforms(plan)({"image": [str(path)]})["image"]
    assert tuple(ours.image.shape) == tuple(theirs.shape)
    np.testing.assert_allclose(ours.affine, np.asarray(theirs.affine), atol=1e-9)
    torch.testing.assert_close(ours.image, theirs.as_tensor().float(), atol=1e-5, rtol=0)


def test_a_long_axis_resamples_as_exactly_as_monai(tmp_path: Path) -> None:
    # Sampling coordinates in float32 drift along a 700-voxel axis (3e-3 of the values here).
    rng = np.random.default_rng(0)
    array = rng.uniform(-200, 1000, (700, 9, 8)).astype(np.float32)
    path = _mha(tmp_path / "long.mha", array, (0.7, 1.0, 1.0))
    plan = _plan([1.3, 1.0, 1.0], [{"scheme": "ct", "clip": [-100, 900], "mean": 300, "std": 15}])
    ours = prepare([read_volume(path)], plan)
    theirs = infer_transforms(plan)({"image": [str(path)]})["image"]
    assert tuple(ours.image.shape) == tuple(theirs.shape)
    torch.testing.assert_close(ours.image, theirs.as_tensor().float(), atol=1e-5, rtol=0)


def test_a_zscore_channel_of_one_foreground_value_is_centred_not_blown_up() -> None:
    binary = torch.zeros(6, 6, 6)
    binary[2:4, 2:4, 2:4] = 5.0
    out = normalize_channel(binary, {"scheme": "zscore"})
    assert torch.equal(out[2:4, 2:4, 2:4], torch.zeros(2, 2, 2))
    assert float(out.min()) == -5.0  # the background, centred on the foreground's value
    assert torch.equal(normalize_channel(torch.full((4, 4, 4), 7.0), {"scheme": "zscore"}), torch.zeros(4, 4, 4))
    assert torch.equal(normalize_channel(torch.zeros(4, 4, 4), {"scheme": "zscore"}), torch.zeros(4, 4, 4))


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_the_class_map_alone_inverts_to_the_same_classes(tmp_path: Path, name: str) -> None:
    """classes_only skips the voxels no class but background can win: the same argmax everywhere,
    the same probabilities inside the box it computes, background outside."""
    affine, target = GEOMETRIES[name]
    path = _write(tmp_path / "in.nii.gz", _image((23, 19, 13)), affine)
    ours = prepare([read_volume(path)], _plan(target))
    shape = ours.image.shape[1:]
    logits = torch.full((3, *shape), -4.0)
    logits[0] = 4.0
    logits[1, 3:8, 2:7, 2:5] = 6.0  # an object of class 1, one of class 2 elsewhere
    logits[2, -4:-2, -3:, 1:3] = 5.0
    logits += 0.5 * torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    probs = torch.softmax(logits, 0)
    full = invert_probabilities(probs, ours)
    only = invert_probabilities(probs, ours, classes_only=True)
    assert torch.equal(full.argmax(0), only.argmax(0)), name
    same = (only == full).all(dim=0)
    background = (only[0] == 1) & (only[1:] == 0).all(dim=0)
    assert bool((same | background).all()) and bool(same.any())
    if name == "axis-aligned":
        assert not bool(same.all())  # the box left most of the grid out
    assert int(full.argmax(0).max()) > 0  # something to segment
    # a prediction of background only: background everywhere, without interpolating
    none = invert_probabilities(
        torch.softmax(torch.stack([logits[0], -logits[0], -logits[0]]), 0), ours, classes_only=True
    )
    assert bool((none[0] == 1).all()) and tuple(none.shape) == (3, 23, 19, 13)
