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


def test_a_centre_between_two_planes_shows_the_same_plane_of_a_flipped_file() -> None:
    # Rounding half to even picked world plane 16 for one storage and 14 for the same scan stored flipped.
    ref = np.zeros((12, 12, 12), bool)
    ref[3:9, 2:8, 4:10] = True  # centre 5.5, 4.5, 6.5: halfway between planes on every axis
    pred = ref.copy()
    planes = overlay_slices(ref, pred, np.eye(4))
    flipped, affine = _stored(ref, (0, 1, 2), (0, 1, 2))
    flipped_planes = overlay_slices(flipped, flipped, affine)
    for name, normal in VIEWS:  # the same world plane: index i there is n - 1 - i here
        assert flipped_planes[name] == ref.shape[normal] - 1 - planes[name], name


def test_markdown_keeps_ampersands_and_leading_numbers_as_typed() -> None:
    from medgn.evaluate.report import md_text

    assert md_text("a&amp;b") == "a\\&amp;b"  # not the character entity "&"
    assert md_text("1. first") == "1\\. first" and md_text("-x") == "\\-x"  # no list starts
    assert md_text("case_1.5") == "case\\_1.5"


def test_a_panel_says_a_mask_is_absent_only_when_it_is(tmp_path) -> None:
    # A mask filling the whole plane draws no contour, and was called absent there.
    from unittest import mock

    from medgn.evaluate import figures

    ref = np.zeros((10, 10, 10), bool)
    ref[:, :, 3:7] = True  # fills axial planes 3-6 completely
    pred = ref.copy()
    pred[:, :, 6] = False
    titles = []
    with mock.patch("matplotlib.axes.Axes.set_title", lambda self, text, *a, **k: titles.append(text)):
        figures._overlay(tmp_path / "o.png", "t", ref.astype(np.float32), ref, pred, np.eye(4))
    # Plane 6 (the most wrong voxels): the reference fills it, the prediction is not in it.
    assert titles == ["axial, slice 6 (no prediction here)", "coronal, slice 4", "sagittal, slice 4"], titles


def test_a_false_positive_off_the_structures_edge_is_in_some_panel() -> None:
    # Planes through the reference missed a small blob above it in all three panels.
    ref = np.zeros((30, 30, 20), bool)
    ref[5:25, 5:25, 3:8] = True
    pred = np.zeros_like(ref)
    pred[6:8, 6:8, 15:18] = True
    planes = overlay_slices(ref, pred, np.eye(4))
    assert 3 <= planes["axial"] < 8  # the reference
    assert 6 <= planes["coronal"] < 8 and 6 <= planes["sagittal"] < 8  # planes that cut both


def test_the_planes_chosen_for_a_false_positive_do_not_depend_on_storage_order() -> None:
    ref = np.zeros((30, 30, 20), bool)
    ref[5:25, 5:25, 3:8] = True
    pred = np.zeros_like(ref)
    pred[6:8, 6:8, 15:18] = True  # two planes tie in each of coronal and sagittal
    planes = overlay_slices(ref, pred, np.eye(4))
    flipped_ref, affine = _stored(ref, (0, 1, 2), (0, 1))
    flipped_pred, _ = _stored(pred, (0, 1, 2), (0, 1))
    flipped = overlay_slices(flipped_ref, flipped_pred, affine)
    for name, normal in VIEWS[1:]:
        assert flipped[name] == ref.shape[normal] - 1 - planes[name], name
