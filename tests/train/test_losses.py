"""Dice + cross-entropy and deep-supervision loss against hand computations in float64."""

from __future__ import annotations

import math

import pytest
import torch

from medgn.train.losses import (
    DeepSupervisionLoss,
    DiceCELoss,
    deep_supervision_weights,
    downsample_label,
    soft_dice_per_class,
)

SMOOTH = 1e-5


def _softmax2(a: float, b: float) -> tuple[float, float]:
    ea, eb = math.exp(a), math.exp(b)
    return ea / (ea + eb), eb / (ea + eb)


def test_dice_ce_matches_hand_computation() -> None:
    # Three voxels, two classes: logits per voxel and the true class.
    logits_list = [(2.0, -1.0), (0.5, 1.5), (-0.3, 0.2)]
    truth = [0, 1, 1]
    logits = torch.tensor(logits_list, dtype=torch.float64).T.reshape(1, 2, 1, 1, 3)
    label = torch.tensor(truth).reshape(1, 1, 1, 1, 3)
    probs = [_softmax2(*v) for v in logits_list]
    ce = sum(-math.log(p[t]) for p, t in zip(probs, truth)) / 3
    tp = sum(p[1] for p, t in zip(probs, truth) if t == 1)
    fp = sum(p[1] for p, t in zip(probs, truth) if t == 0)
    fn = sum(1 - p[1] for p, t in zip(probs, truth) if t == 1)
    dice1 = (2 * tp + SMOOTH) / (2 * tp + fp + fn + SMOOTH)
    got = DiceCELoss(dice_weight=1.0, ce_weight=1.0)(logits, label)
    assert float(got) == pytest.approx(ce + 1 - dice1, rel=1e-6)
    weighted = DiceCELoss(dice_weight=0.5, ce_weight=2.0)(logits, label)
    assert float(weighted) == pytest.approx(2 * ce + 0.5 * (1 - dice1), rel=1e-6)


@pytest.mark.parametrize("include_background", [False, True])
def test_batch_dice_pools_the_batch(include_background: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 3, 2, 4, generator=gen, dtype=torch.float64)
    label = torch.randint(0, 3, (2, 1, 3, 2, 4), generator=gen)
    probs = torch.softmax(logits, 1)
    onehot = torch.stack([(label[:, 0] == k).double() for k in range(3)], 1)

    def dice(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tp, fp, fn = (p * y).sum(), (p * (1 - y)).sum(), ((1 - p) * y).sum()
        return (2 * tp + SMOOTH) / (2 * tp + fp + fn + SMOOTH)

    first = 0 if include_background else 1
    pooled = torch.stack([dice(probs[:, k], onehot[:, k]) for k in range(first, 3)])
    per_case = torch.stack([torch.stack([dice(probs[b, k], onehot[b, k]) for k in range(first, 3)]) for b in range(2)])
    got_pooled = soft_dice_per_class(logits, label, batch_dice=True, include_background=include_background)
    got_case = soft_dice_per_class(logits, label, batch_dice=False, include_background=include_background)
    torch.testing.assert_close(got_pooled.double(), pooled, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_case.double(), per_case, rtol=1e-6, atol=1e-7)


def test_perfect_prediction_has_near_zero_loss() -> None:
    label = torch.zeros(1, 1, 4, 4, 4, dtype=torch.int64)
    label[:, :, 1:3, 1:3, 1:3] = 1
    logits = torch.cat([(label == 0).float(), (label == 1).float()], 1) * 40.0  # 40: softmax saturates
    assert float(DiceCELoss()(logits, label)) < 1e-6


@pytest.mark.parametrize(
    ("heads", "expected"), [(1, [1.0]), (2, [1.0, 0.0]), (3, [2 / 3, 1 / 3, 0.0]), (4, [4 / 7, 2 / 7, 1 / 7, 0.0])]
)
def test_deep_supervision_weights_halve_and_normalise(heads: int, expected: list[float]) -> None:
    assert deep_supervision_weights(heads) == pytest.approx(expected)
    assert sum(deep_supervision_weights(heads, drop_lowest=False)) == pytest.approx(1.0)
    assert deep_supervision_weights(3, drop_lowest=False) == pytest.approx([4 / 7, 2 / 7, 1 / 7])


def test_downsample_label_is_nearest_voxel_centre() -> None:
    label = torch.randint(0, 4, (2, 1, 4, 6, 8), generator=torch.Generator().manual_seed(1))
    small = downsample_label(label, (2, 3, 4))
    assert small.dtype == label.dtype
    # Voxel-centre nearest neighbour at a factor of 2 picks the odd input indices.
    assert torch.equal(small, label[:, :, 1::2, 1::2, 1::2])


def test_deep_supervision_loss_is_the_weighted_sum() -> None:
    gen = torch.Generator().manual_seed(2)
    label = torch.randint(0, 2, (1, 1, 4, 4, 4), generator=gen)
    heads = [
        torch.randn(1, 2, 4, 4, 4, generator=gen),
        torch.randn(1, 2, 2, 2, 2, generator=gen),
        torch.randn(1, 2, 1, 1, 1, generator=gen),
    ]
    base = DiceCELoss()
    expected = 2 / 3 * base(heads[0], label) + 1 / 3 * base(heads[1], label[:, :, 1::2, 1::2, 1::2])
    got = DeepSupervisionLoss(base)(heads, label)
    assert float(got) == pytest.approx(float(expected), rel=1e-6)
    assert float(DeepSupervisionLoss(base)(heads[0], label)) == pytest.approx(float(base(heads[0], label)))
