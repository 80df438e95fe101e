"""Post-processing chosen from held-out cases: on where it helps, off where it would cut true anatomy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medgn.infer import postprocess
from medgn.infer.postprocess import PostProcessing


def _ball(shape: tuple[int, int, int], centre: tuple[int, int, int], radius: float) -> np.ndarray:
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def _blob_cases(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """One organ per case; the prediction adds a spurious blob far from it (LCC removes it)."""
    cases = []
    for i in range(n):
        ref = _ball((24, 24, 24), (8 + i % 3, 10, 10), 5).astype(np.uint8)
        pred = ref.copy()
        pred[_ball((24, 24, 24), (20, 20, 20), 2)] = 1
        cases.append((pred, ref))
    return cases


def _two_part_cases(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """An organ of two separate parts (like kidneys under one label), predicted exactly."""
    cases = []
    for i in range(n):
        ref = (_ball((24, 24, 24), (6, 12, 12), 4 + i % 2) | _ball((24, 24, 24), (18, 12, 12), 3)).astype(np.uint8)
        cases.append((ref.copy(), ref))
    return cases


def test_largest_component_keeps_the_biggest_piece_only() -> None:
    mask = _ball((20, 20, 20), (6, 6, 6), 4) | _ball((20, 20, 20), (16, 16, 16), 2)
    kept = postprocess.largest_component(mask)
    assert kept.sum() == _ball((20, 20, 20), (6, 6, 6), 4).sum() and not kept[16, 16, 16]
    assert not postprocess.largest_component(np.zeros((4, 4, 4), bool)).any()


def _scipy_largest(mask: np.ndarray) -> np.ndarray:
    """The reference: scipy's 26-connected labelling of the whole grid, then the first largest label."""
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    if count == 0:
        return mask.copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


@pytest.mark.parametrize("seed", range(4))
def test_largest_component_equals_scipys_labelling_of_the_whole_grid(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = np.zeros((30, 26, 22), bool)
    mask[3:20, 5:24, 2:15] = rng.random((17, 19, 13)) < 0.3  # many pieces, some of equal size
    kept = postprocess.largest_component(mask)
    assert kept.shape == mask.shape and kept.dtype == bool
    assert 0 < kept.sum() < mask.sum()  # pieces were dropped
    np.testing.assert_array_equal(kept, _scipy_largest(mask))


def test_largest_component_matches_scipy_on_many_small_masks_of_one_to_three_axes() -> None:
    # Edge rows and columns, runs touching only diagonally, masks of one voxel or all voxels, and ties
    # between pieces of equal size (the first in C order wins, as with scipy's label order).
    rng = np.random.default_rng(7)
    for _ in range(1500):
        shape = tuple(int(n) for n in rng.integers(1, 8, size=int(rng.integers(1, 4))))
        mask = rng.random(shape) < rng.uniform(0.05, 0.8)
        kept = postprocess.largest_component(mask)
        assert kept.shape == mask.shape and kept.dtype == bool
        np.testing.assert_array_equal(kept, _scipy_largest(mask), err_msg=f"{shape}\n{mask.astype(int)}")


def test_largest_component_joins_runs_that_touch_only_at_a_corner() -> None:
    mask = np.zeros((3, 3, 3), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = True  # a chain of voxels meeting at corners
    mask[0, 2, 0] = True  # meets (1, 1, 1) at a corner as well: all four are one piece
    assert postprocess.largest_component(mask).sum() == 4
    two = np.zeros((2, 6), bool)
    two[0, 0:2] = two[1, 3:5] = True  # a gap of one column between the runs: two pieces
    np.testing.assert_array_equal(postprocess.largest_component(two), two & (np.arange(6) < 2))


def test_largest_component_refuses_more_than_three_axes() -> None:
    with pytest.raises(ValueError, match="at most 3 axes"):
        postprocess.largest_component(np.ones((2, 2, 2, 2), bool))


def test_a_spurious_blob_turns_the_filter_on_and_apply_removes_it() -> None:
    cases = _blob_cases(4)
    decision = postprocess.decide([postprocess.lcc_evidence(p, r, [1]) for p, r in cases])
    assert decision.lcc == {1: True} and decision.source == "cross-validation"
    ev = decision.evidence["1"]
    assert ev["dice_largest_component"] == pytest.approx(1.0) and ev["dice"] < 0.99 and ev["cases"] == 4
    pred, ref = cases[0]
    assert np.array_equal(postprocess.apply(pred, decision), ref)


def test_a_two_part_organ_keeps_the_filter_off() -> None:
    cases = _two_part_cases(4)
    decision = postprocess.decide([postprocess.lcc_evidence(p, r, [1]) for p, r in cases])
    assert decision.lcc == {1: False}
    assert decision.evidence["1"]["dice"] == pytest.approx(1.0)
    assert decision.evidence["1"]["dice_largest_component"] < 0.9  # the smaller part is lost
    pred, _ = cases[0]
    assert np.array_equal(postprocess.apply(pred, decision), pred)  # nothing removed


def test_classes_are_decided_separately_and_pooled_over_folds() -> None:
    blob, two = _blob_cases(3), _two_part_cases(3)
    per_case = []
    for (pb, rb), (pt, rt) in zip(blob, two):
        pred = np.where(pt == 1, 2, pb).astype(np.uint8)  # class 1: organ + blob, class 2: two parts
        ref = np.where(rt == 1, 2, rb).astype(np.uint8)
        per_case.append(postprocess.lcc_evidence(pred, ref, [1, 2]))
    fold_a, fold_b = postprocess.decide(per_case[:2]), postprocess.decide(per_case[2:])
    both = postprocess.pooled([fold_a, fold_b])
    assert both.lcc == {1: True, 2: False}
    assert both.evidence["1"]["cases"] == 3
    assert PostProcessing.from_dict(both.to_dict()) == both


def test_reference_topology_decides_without_held_out_cases() -> None:
    one_piece = [postprocess.topology_evidence(r, [1]) for _, r in _blob_cases(3)]
    assert postprocess.decide_from_topology(one_piece).lcc == {1: True}
    mixed = one_piece + [postprocess.topology_evidence(_two_part_cases(1)[0][1], [1])]
    decision = postprocess.decide_from_topology(mixed)
    assert decision.lcc == {1: False} and decision.evidence["1"] == {"one_piece": 3, "cases": 4}


@pytest.mark.parametrize(
    "text", ["{not json", "[1, 2]", '{"lcc": {"one": true}}', '{"lcc": [1, 2]}', '{"lcc": {"1": "yes"}}', "\xff\xfe"]
)
def test_an_unreadable_decision_file_is_a_model_error_naming_it(tmp_path: Path, text: str) -> None:
    from medgn.errors import ModelError

    path = tmp_path / postprocess.FILE
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ModelError, match="unreadable post-processing decision") as info:
        PostProcessing.load(tmp_path)
    assert info.value.code == 4 and str(path) in str(info.value)
    path.write_text('{"lcc": {"1": true}, "source": "cross-validation"}')
    assert PostProcessing.load(tmp_path).lcc == {1: True}


def test_one_models_decision_keeps_its_evidence() -> None:
    """The sidecar of a one-model run said evidence {} for a decision its postprocessing.json explains."""
    decision = postprocess.decide_from_topology([postprocess.topology_evidence(r, [1]) for _, r in _blob_cases(3)])
    assert postprocess.pooled([decision]) == decision and decision.evidence["1"] == {"one_piece": 3, "cases": 3}


def test_a_single_voxel_is_its_own_largest_component() -> None:
    assert postprocess.largest_component(np.array(True)) and not postprocess.largest_component(np.array(False))
