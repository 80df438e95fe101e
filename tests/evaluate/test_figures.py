"""What the evaluation figures show: orientation, the planes, the grey window, the box plot's words."""

from __future__ import annotations

import numpy as np
import pytest

from medgn.evaluate.figures import VIEWS, _normal_axis, _plane, _window, overlay_slices


def _stored(volume: np.ndarray, order: tuple[int, int, int], flips: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``volume`` (RAS array axes, 1 mm, identity affine) stored with its axes permuted and flipped,
    and the affine that keeps every voxel at its world position."""
    array, affine = volume, np.eye(4)
    for axis in flips:  # index i of a flipped axis is world position (n - 1 - i)
        array = np.flip(array, axis)
        flip = np.eye(4)
        flip[axis, axis], flip[axis, 3] = -1.0, volume.shape[axis] - 1
        affine = affine @ flip
    array = np.transpose(array, order)
    permute = np.zeros((4, 4))
    for new, old in enumerate(order):
        permute[old, new] = 1.0
    permute[3, 3] = 1.0
    return np.ascontiguousarray(array), affine @ permute


STORAGES = {
    "RAS": ((0, 1, 2), ()),
    "LPS": ((0, 1, 2), (0, 1)),
    "SRA": ((2, 0, 1), ()),  # slices first: the axes a sagittal panel shows come out transposed
    "ALS": ((1, 0, 2), (0,)),
}


@pytest.mark.parametrize("storage", list(STORAGES))
def test_every_storage_order_of_one_volume_shows_the_same_planes(storage: str) -> None:
    # Array axes stored other than R, A, S were shown rotated a quarter turn (the sagittal and
    # coronal planes of a file with its slices first, the axial plane of an A, L, S one).
    rng = np.random.default_rng(0)
    volume = rng.random((7, 9, 11)).astype(np.float32)
    array, affine = _stored(volume, *STORAGES[storage])
    for name, normal in VIEWS:
        world = np.zeros(4)
        world[normal], world[3] = 4.0, 1.0  # the plane 4 mm along this view's normal
        voxel = np.rint(np.linalg.inv(affine) @ world).astype(int)
        want = _plane(volume, np.eye(4), 4, normal)
        got = _plane(array, affine, int(voxel[_normal_axis(affine, normal)]), normal)
        np.testing.assert_array_equal(got[0], want[0], err_msg=f"{storage} {name}")
        assert got[1:] == want[1:]


def test_planes_are_in_radiological_convention() -> None:
    volume = np.zeros((10, 12, 8), np.float32)
    volume[8, 9, 6] = 1.0  # toward the patient's right (+R), anterior (+A) and superior (+S)
    axial, _, horizontal, vertical = _plane(volume, np.eye(4), 6, 2)
    row, col = np.argwhere(axial)[0]
    assert (horizontal, vertical) == (0, 1)
    assert col < axial.shape[1] // 2  # the patient's right on the viewer's left
    assert row > axial.shape[0] // 2  # anterior up (origin="lower")
    sagittal, _, horizontal, vertical = _plane(volume, np.eye(4), 8, 0)
    row, col = np.argwhere(sagittal)[0]
    assert (horizontal, vertical) == (1, 2) and col < sagittal.shape[1] // 2 and row > sagittal.shape[0] // 2


def test_a_prediction_beside_the_reference_is_shown() -> None:
    # No plane that cut the reference held any of it: every panel showed the reference alone.
    ref = np.zeros((30, 30, 30), bool)
    ref[3:8, 3:8, 3:8] = True
    pred = np.zeros_like(ref)
    pred[20:24, 20:24, 20:24] = True
    planes = overlay_slices(ref, pred, np.eye(4))
    assert 3 <= planes["axial"] < 8  # the reference's planes
    assert 20 <= planes["coronal"] < 24 and 20 <= planes["sagittal"] < 24  # the prediction's
    near = np.zeros_like(ref)
    near[5:9, 3:8, 3:8] = True  # overlapping planes exist: every view shows both
    assert all(3 <= v < 8 for v in overlay_slices(ref, near, np.eye(4)).values())


def test_a_few_bright_voxels_do_not_set_the_grey_window() -> None:
    image = np.random.default_rng(1).normal(40, 8, (40, 40, 40)).astype(np.float32)
    image[5, 5, 10:30] = 2000.0  # contrast or metal in a few voxels
    lo, hi = _window(image)
    assert 10 < lo < 30 and 50 < hi < 70
    assert _window(np.zeros((4, 4, 4))) == (0.0, 1.0)  # a label map under the contours, all background
