"""Tests of medgn.evaluate.metrics: shapes whose metrics are known by construction, the empty policy,
agreement with MONAI's compute_* functions and a float64 brute-force surface-distance reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_erosion
from scipy.spatial.distance import cdist

from medgn.evaluate.metrics import (
    FLAG_BOTH_EMPTY,
    FLAG_PRED_EMPTY,
    FLAG_REF_EMPTY,
    binary_metrics,
    case_metrics,
    failed_metrics,
    summarize,
)


def _cubes(side: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference cube and the same cube shifted by ``offset`` voxels along axis 0."""
    ref = np.zeros((side + offset + 6, side + 6, side + 6), dtype=np.uint8)
    pred = np.zeros_like(ref)
    ref[3 : 3 + side, 3 : 3 + side, 3 : 3 + side] = 1
    pred[3 + offset : 3 + side + offset, 3 : 3 + side, 3 : 3 + side] = 1
    return pred, ref


def _reference_surface(pred: np.ndarray, ref: np.ndarray, spacing, tol: float) -> tuple[float, float, float]:
    """Brute-force float64 HD95/ASSD/NSD: surface voxels by erosion, all pairwise distances."""
    sp = np.asarray(spacing, dtype=np.float64)

    def points(mask: np.ndarray) -> np.ndarray:
        mask = mask.astype(bool)
        return np.argwhere(mask & ~binary_erosion(mask)).astype(np.float64) * sp

    p, r = points(pred), points(ref)
    dist = cdist(p, r)
    d_pr, d_rp = dist.min(axis=1), dist.min(axis=0)
    hd95 = max(np.percentile(d_pr, 95), np.percentile(d_rp, 95))
    assd = np.concatenate([d_pr, d_rp]).mean()
    nsd = (np.sum(d_pr <= tol) + np.sum(d_rp <= tol)) / (d_pr.size + d_rp.size)
    return float(hd95), float(assd), float(nsd)


@pytest.mark.parametrize("offset", [1, 2])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.5, 1.0, 2.0)])
def test_offset_cubes_known_by_construction(offset: int, spacing: tuple[float, float, float]) -> None:
    side = 8
    pred, ref = _cubes(side, offset)
    m = binary_metrics(pred, ref, spacing, nsd_tolerance_mm=1.0)
    # Overlap of two side-s cubes shifted by d: s^2 (s - d) voxels out of 2 s^3.
    assert m.dice == pytest.approx((side - offset) / side, abs=1e-12)
    assert m.iou == pytest.approx((side - offset) / (side + offset), abs=1e-12)
    # Every voxel of the leading face is exactly d*sx from the other surface, nothing is farther,
    # and that face holds more than 5 % of the surface: HD95 equals the offset in mm.
    assert m.hd95 == pytest.approx(offset * spacing[0], abs=1e-6)
    hd95, assd, nsd = _reference_surface(pred, ref, spacing, 1.0)
    assert m.hd95 == pytest.approx(hd95, abs=1e-6)
    assert m.assd == pytest.approx(assd, rel=1e-6)
    assert m.nsd == pytest.approx(nsd, abs=1e-9)
    assert m.flags == ()
    # A tolerance reaching the offset makes every surface point correct.
    assert binary_metrics(pred, ref, spacing, nsd_tolerance_mm=offset * spacing[0]).nsd == 1.0
    assert binary_metrics(pred, ref, spacing, nsd_tolerance_mm=offset * spacing[0] - 0.01).nsd < 1.0


def _sphere(shape, spacing, centre_mm, radius_mm) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre_mm)) <= radius_mm**2


def test_spheres_at_anisotropic_spacing() -> None:
    spacing = (0.8, 1.0, 2.5)
    shape = (40, 32, 14)
    centre = (16.0, 16.0, 16.0)
    r_ref, r_pred = 9.0, 11.0
    m = binary_metrics(_sphere(shape, spacing, centre, r_pred), _sphere(shape, spacing, centre, r_ref), spacing, 3.0)
    # Continuous values; the voxel grid departs from them by about one voxel on the surface.
    dice = 2 * r_ref**3 / (r_ref**3 + r_pred**3)
    assert m.dice == pytest.approx(dice, abs=0.05)
    assert abs(m.hd95 - (r_pred - r_ref)) <= max(spacing)
    assert abs(m.assd - (r_pred - r_ref)) <= max(spacing)
    tol = (r_pred - r_ref) + max(spacing)
    assert (
        binary_metrics(
            _sphere(shape, spacing, centre, r_pred), _sphere(shape, spacing, centre, r_ref), spacing, tol
        ).nsd
        == 1.0
    )


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecation inside compute_*
def test_agrees_with_monai_compute_functions() -> None:
    from monai.metrics import (
        compute_average_surface_distance,
        compute_hausdorff_distance,
        compute_surface_dice,
    )

    rng = np.random.default_rng(0)
    ref = np.zeros((18, 16, 12), dtype=bool)
    ref[3:14, 4:12, 2:10] = True
    pred = ref.copy()
    pred[rng.random(ref.shape) < 0.08] ^= True  # speckle: irregular surfaces
    spacing = [0.7, 1.1, 1.9]
    m = binary_metrics(pred, ref, spacing, nsd_tolerance_mm=1.5)
    p, r = torch.from_numpy(pred)[None, None], torch.from_numpy(ref)[None, None]
    assert m.hd95 == pytest.approx(
        compute_hausdorff_distance(p, r, True, percentile=95, spacing=spacing).item(), rel=1e-5
    )
    assert m.assd == pytest.approx(
        compute_average_surface_distance(p, r, True, symmetric=True, spacing=spacing).item(), rel=1e-5
    )
    assert m.nsd == pytest.approx(compute_surface_dice(p, r, [1.5], True, spacing=spacing).item(), abs=1e-6)
    inter = np.sum(pred & ref, dtype=np.float64)
    assert m.dice == pytest.approx(2 * inter / (pred.sum() + ref.sum()), abs=1e-12)


def test_empty_policy() -> None:
    empty = np.zeros((6, 6, 6), dtype=np.uint8)
    full = empty.copy()
    full[2:4, 2:4, 2:4] = 1
    both = binary_metrics(empty, empty, (1, 1, 1))
    assert (both.dice, both.iou, both.hd95, both.assd, both.nsd, both.flags) == (
        1.0,
        1.0,
        0.0,
        0.0,
        1.0,
        (FLAG_BOTH_EMPTY,),
    )
    ref_empty = binary_metrics(full, empty, (1, 1, 1))
    assert ref_empty.dice == 0.0 and math.isinf(ref_empty.hd95) and math.isinf(ref_empty.assd)
    assert ref_empty.flags == (FLAG_REF_EMPTY,)
    pred_empty = binary_metrics(empty, full, (1, 1, 1))
    assert pred_empty.flags == (FLAG_PRED_EMPTY,) and pred_empty.nsd == 0.0
    assert failed_metrics("missing").dice == 0.0 and math.isinf(failed_metrics("missing").hd95)


def test_case_metrics_labels_and_region_union() -> None:
    ref = np.zeros((12, 12, 12), dtype=np.uint8)
    ref[2:6, 2:6, 2:6] = 1
    ref[6:10, 2:6, 2:6] = 2
    pred = ref.copy()
    pred[pred == 2] = 1  # labels 1 and 2 confused, their union is perfect
    out = case_metrics(pred, ref, (1.0, 1.0, 1.0), labels=[1, 2, 3], regions={"whole": (1, 2)})
    assert list(out) == ["1", "2", "3", "whole"]
    assert out["1"].dice == pytest.approx(2 * 64 / (128 + 64))
    assert out["2"].flags == (FLAG_PRED_EMPTY,)
    assert out["3"].flags == (FLAG_BOTH_EMPTY,)
    assert out["whole"].dice == 1.0 and out["whole"].hd95 == 0.0


def test_summarize_keeps_infinity_out_of_the_statistics() -> None:
    stats = summarize([1.0, 3.0, math.inf, 2.0])
    assert stats == {
        "n": 4,
        "n_finite": 3,
        "n_inf": 1,
        "mean": 2.0,
        "std": pytest.approx(np.std([1, 3, 2])),
        "median": 2.0,
        "min": 1.0,
        "max": 3.0,
    }
    assert summarize([math.inf])["mean"] is None
    with pytest.raises(ValueError, match="NaN"):
        summarize([float("nan")])


def test_bad_arguments_are_refused() -> None:
    a = np.ones((4, 4, 4), dtype=bool)
    with pytest.raises(ValueError, match="shape"):
        binary_metrics(a, a[:3], (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        binary_metrics(a, a, (1, 0, 1))
    with pytest.raises(ValueError, match="tolerance"):
        binary_metrics(a, a, (1, 1, 1), nsd_tolerance_mm=-1)


@pytest.mark.parametrize("spacing", [0.3, 0.6, 0.8, float(np.float32(0.6))])
@pytest.mark.parametrize("shift", [1, 2])
def test_a_distance_equal_to_the_tolerance_is_within_it(spacing: float, shift: int) -> None:
    """A shift of ``shift`` voxels at a tolerance of exactly that many mm: every surface point is within it.

    Float32 distances compared with a float64 tolerance put 0.6 (0.60000002 in float32) outside a
    0.6 mm tolerance; MONAI compares both in float32. The spacing of a NIfTI header is float32 itself.
    """
    from monai.metrics import compute_surface_dice

    ref = np.zeros((30, 30, 16), dtype=bool)
    ref[6:18, 6:18, 4:10] = True
    pred = np.roll(ref, shift, axis=0)
    tolerance = round(shift * spacing, 10) if spacing in (0.3, 0.6, 0.8) else shift * 0.6
    m = binary_metrics(pred, ref, [spacing] * 3, nsd_tolerance_mm=tolerance)
    assert m.nsd == 1.0
    p, r = torch.from_numpy(pred)[None, None], torch.from_numpy(ref)[None, None]
    assert compute_surface_dice(p, r, [tolerance], True, spacing=[spacing] * 3).item() == 1.0
    # Just below the distance, the shifted faces fall outside.
    assert binary_metrics(pred, ref, [spacing] * 3, nsd_tolerance_mm=tolerance * 0.999).nsd < 1.0
