"""Tests for the rotated and zoomed training patches: geometry, zeros only beyond the scan, sampling."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.transforms import Compose

from medgn.data.augment import FOREGROUND_KEY, ForegroundIndicesd, RandPatchAffined, rotation_matrix, sample_box
from medgn.data.config import DataConfig
from medgn.data.pipeline import train_transforms

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _ramp(shape: tuple[int, int, int], axis: int) -> torch.Tensor:
    """A volume whose value is the voxel's index along ``axis`` (bilinear sampling of it is exact)."""
    index = torch.arange(shape[axis], dtype=torch.float32).view(*[-1 if a == axis else 1 for a in range(3)])
    return index.expand(*shape).clone()[None]


def test_identity_box_is_the_plain_crop() -> None:
    volume = torch.randn(2, 9, 8, 7)
    centre = np.array([3.5, 3.0, 4.5])  # the box [1:7, 1:6, 3:7] of a 6x5x4 patch
    for mode in ("nearest", "bilinear"):
        out = sample_box(volume, centre, np.eye(3), [6, 5, 4], mode)
        torch.testing.assert_close(out, volume[:, 1:7, 1:6, 3:7], rtol=0, atol=1e-5)


def test_quarter_turn_about_axis_0_is_rot90() -> None:
    volume = torch.arange(5 * 5 * 5, dtype=torch.float32).reshape(1, 5, 5, 5)
    out = sample_box(volume, np.array([2.0, 2.0, 2.0]), rotation_matrix([math.pi / 2, 0, 0]), [5, 5, 5], "nearest")
    assert torch.equal(out, torch.rot90(volume, -1, dims=(2, 3)))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_rotation_and_zoom_move_the_sampling_grid(axis: int) -> None:
    """On a ramp along axis 1 a rotation by t about ``axis`` and a zoom z give slopes R[1, :] / z."""
    volume = _ramp((40, 40, 40), 1)
    angles = [0.0, 0.0, 0.0]
    angles[axis] = 0.3
    zoom = 0.8
    matrix = rotation_matrix(angles) / zoom
    out = sample_box(volume, np.array([20.0, 19.5, 20.5]), matrix, [8, 6, 4], "bilinear")[0]
    slopes = [out.diff(dim=a).mean().item() for a in range(3)]
    np.testing.assert_allclose(slopes, matrix[1], atol=1e-4)
    assert out[0, 0, 0].item() == pytest.approx(19.5 - matrix[1] @ np.array([3.5, 2.5, 1.5]), abs=1e-4)


def test_zeros_only_beyond_the_volume() -> None:
    volume = torch.arange(6 * 5 * 4, dtype=torch.float32).reshape(1, 6, 5, 4) + 1.0
    out = sample_box(volume, np.array([2.5, 2.0, 1.5]), np.eye(3), [8, 5, 4], "nearest")
    assert out[0, :, 0, 0].tolist() == [0.0, 1.0, 21.0, 41.0, 61.0, 81.0, 101.0, 0.0]
    flat = torch.randn(1, 6, 5, 1)  # a one-voxel axis still samples exactly
    torch.testing.assert_close(sample_box(flat, np.array([2.5, 2.0, 0.0]), np.eye(3), [6, 5, 1], "bilinear"), flat)


def test_rotated_patch_inside_the_scan_has_no_made_up_voxels() -> None:
    """The neighbourhood is resampled: a patch well inside a constant scan stays constant.

    Rotating the patch after cutting it out (MONAI's RandRotated behind the crop) fills its corners.
    """
    from monai.transforms import RandRotate

    scan = torch.ones(1, 120, 120, 80)
    matrix = rotation_matrix([0.26, -0.26, 0.26]) / 0.85
    patch = sample_box(scan, np.array([60.0, 60.0, 40.0]), matrix, [64, 64, 32], "bilinear")
    assert patch.shape == (1, 64, 64, 32) and torch.allclose(patch, torch.ones_like(patch))
    rotate_after = RandRotate(range_x=0.26, range_y=0.26, range_z=0.26, prob=1.0, padding_mode="zeros")
    rotate_after.set_random_state(0)
    corners = rotate_after(scan[:, :64, :64, :32])
    assert float((torch.as_tensor(corners) < 0.5).float().mean()) > 0.02


def _blobs() -> dict[str, torch.Tensor]:
    label = torch.zeros(1, 30, 28, 20)
    label[:, 10:16, 8:14, 6:12] = 1
    label[:, 12:14, 9:11, 7:9] = 2
    image = torch.arange(label.numel(), dtype=torch.float32).reshape(label.shape)
    return {"image": image, "label": label}


def test_patches_are_seeded_keep_classes_and_find_foreground() -> None:
    def draw(seed: int) -> list[dict[str, torch.Tensor]]:
        t = RandPatchAffined(
            ["image", "label"],
            "label",
            [8, 8, 6],
            pos=1.0,
            num_samples=4,
            prob_rotate=1.0,
            rotate_rad=math.radians(30),
            prob_scale=1.0,
            zoom_range=(0.7, 1.4),
        )
        t.set_random_state(seed)
        return t(_blobs())

    a, b, c = draw(1), draw(1), draw(2)
    assert len(a) == 4 and all(s["image"].shape == (1, 8, 8, 6) and s["label"].shape == (1, 8, 8, 6) for s in a)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0]["image"], c[0]["image"])
    for s in a + c:
        assert set(s["label"].unique().tolist()) <= {0.0, 1.0, 2.0}  # nearest: no blended class values
        assert bool((s["label"] > 0).any())  # every centre is a foreground voxel


def test_without_rotation_or_zoom_a_patch_is_a_plain_crop() -> None:
    data = _blobs()
    t = RandPatchAffined(["image", "label"], "label", [8, 8, 6], pos=0.5, num_samples=8)
    t.set_random_state(3)
    for s in t(data):
        first = int(s["image"][0, 0, 0, 0])
        start = np.unravel_index(first, data["image"].shape[1:])
        sl = tuple(slice(int(i), int(i) + p) for i, p in zip(start, (8, 8, 6), strict=True))
        assert torch.equal(s["image"], data["image"][(slice(None), *sl)])
        assert torch.equal(s["label"], data["label"][(slice(None), *sl)])


def test_training_pipeline_crops_with_the_cached_foreground_list() -> None:
    plan = SimpleNamespace(
        normalization=[{"scheme": "zscore"}], label_values=[0, 1], target_spacing=[1.0] * 3, patch_size=(8, 8, 8)
    )
    names = [type(t).__name__ for t in train_transforms(plan, DataConfig(prob_rotate=0.2)).transforms]
    assert "RandPatchAffined" in names and "RandRotated" not in names and "RandZoomd" not in names
    assert names.index("ForegroundIndicesd") == names.index("RandPatchAffined") - 1  # cached with the case


def test_bad_zoom_range_is_refused() -> None:
    with pytest.raises(ValueError, match="zoom range"):
        RandPatchAffined(["image", "label"], "label", [8, 8, 8], pos=0.5, zoom_range=(0.0, 1.0))


def test_centres_follow_the_foreground_ratio_with_or_without_the_cached_list() -> None:
    data = _blobs()
    listed = ForegroundIndicesd("label")(data)
    assert listed[FOREGROUND_KEY].dtype == torch.int32 and len(listed[FOREGROUND_KEY]) == 6 * 6 * 6

    def centres(sample: dict[str, torch.Tensor], seed: int) -> list[np.ndarray]:
        t = RandPatchAffined(["image", "label"], "label", [4, 4, 4], pos=0.3, num_samples=400)
        t.set_random_state(seed)
        return t._centres(sample, sample["label"])

    with_list, without = centres(listed, 7), centres(data, 7)  # a cache written before the list existed
    assert all(np.array_equal(a, b) for a, b in zip(with_list, without, strict=True))
    in_fg = np.mean([bool(data["label"][(0, *c)] > 0) for c in with_list])
    assert 0.22 < in_fg < 0.38  # 30 % foreground centres (binomial sd 2.3 %); the blob is 1 % of the case


def test_a_patch_never_writes_into_the_cached_case() -> None:
    plan = SimpleNamespace(
        normalization=[{"scheme": "zscore"}], label_values=[0, 1], target_spacing=[1.0] * 3, patch_size=(8, 8, 6)
    )
    steps = train_transforms(plan, DataConfig(prob_rotate=0.0, prob_scale=0.0, prob_noise=1.0)).transforms
    first = next(i for i, t in enumerate(steps) if isinstance(t, RandPatchAffined))
    augment = Compose(steps[first:])
    cached = ForegroundIndicesd("label")(_blobs())
    before = {k: v.clone() for k, v in cached.items()}
    for seed in range(10):
        augment.set_random_state(seed)
        augment(dict(cached))
    assert all(torch.equal(cached[k], before[k]) for k in before)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    shape=st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 12)),
    patch=st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 12)),
    fill=st.sampled_from(["none", "one", "blob", "all"]),
    pos=st.floats(0.0, 1.0),
    prob=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_any_case_gives_patches_of_the_patch_size(
    shape: tuple[int, int, int], patch: tuple[int, int, int], fill: str, pos: float, prob: float, seed: int
) -> None:
    """Through the whole training suffix: no foreground, one voxel, all foreground, thin and flat cases."""
    from monai.transforms import SpatialPadd

    label = torch.zeros(1, *shape)
    if fill == "one":
        label[(0, *(s // 2 for s in shape))] = 2
    elif fill == "blob":
        label[:, : max(1, shape[0] // 2), : max(1, shape[1] // 2)] = 1
    elif fill == "all":
        label[:] = 1
    case = SpatialPadd(["image", "label"], spatial_size=patch)({"image": torch.randn(1, *shape), "label": label})
    case = ForegroundIndicesd("label")(case)
    t = RandPatchAffined(
        ["image", "label"],
        "label",
        list(patch),
        pos=pos,
        num_samples=3,
        prob_rotate=prob,
        rotate_rad=math.radians(30),
        prob_scale=prob,
        zoom_range=(0.7, 1.4),
    )
    t.set_random_state(seed)
    for sample in t(case):
        assert sample["image"].shape == (1, *patch) and sample["label"].shape == (1, *patch)
        assert torch.isfinite(sample["image"]).all() and set(sample["label"].unique().tolist()) <= {0.0, 1.0, 2.0}
        assert FOREGROUND_KEY not in sample
