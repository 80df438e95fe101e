"""Segmentation losses: soft Dice + cross-entropy, and its deep-supervision wrapper.

:class:`DiceCELoss` is nnU-Net's compound loss (soft Dice on softmax probabilities, optionally
"batch Dice" pooling the batch into one volume, plus cross-entropy), written as
``ce_weight * CE + dice_weight * (1 - mean Dice)`` so it is non-negative and 0 at a perfect
prediction. :class:`DeepSupervisionLoss` applies it to every head of a deep-supervised network
(full resolution first), with labels downsampled by nearest neighbour to each head's shape and the
halving, normalised weights of :func:`deep_supervision_weights`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medgn.train.config import TrainConfig

# nnU-Net's soft-Dice smoothing: keeps empty classes finite without biasing large ones.
DICE_SMOOTH = 1e-5


def soft_dice_per_class(
    logits: torch.Tensor,
    label: torch.Tensor,
    *,
    batch_dice: bool = False,
    include_background: bool = False,
    smooth: float = DICE_SMOOTH,
) -> torch.Tensor:
    """Soft Dice of softmax(logits) against an integer label map.

    Args:
        logits: (B, K, *spatial) raw network outputs.
        label: (B, 1, *spatial) or (B, *spatial) integer classes in [0, K).
        batch_dice: pool the batch into one volume per class (nnU-Net "batch Dice").
        include_background: keep class 0 in the result.
        smooth: added to numerator and denominator.

    Returns:
        (K or K-1,) Dice per class when ``batch_dice``, else (B, K or K-1).
    """
    probs = torch.softmax(logits.float(), dim=1)  # (B, K, *spatial), fp32 for stable sums
    target = _one_hot(label, logits)
    axes = tuple(range(2, logits.ndim))
    if batch_dice:
        axes = (0, *axes)
    tp = (probs * target).sum(axes)
    fp = (probs * (1 - target)).sum(axes)
    fn = ((1 - probs) * target).sum(axes)
    dice = (2 * tp + smooth) / (2 * tp + fp + fn + smooth).clamp_min(1e-8)  # clamp: 0/0 guard
    if not include_background:
        dice = dice[..., 1:]
    return dice


def _one_hot(label: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    if label.ndim == logits.ndim:
        label = label[:, 0]  # (B, 1, *spatial) -> (B, *spatial)
    # (B, *spatial) -> (B, K, *spatial)
    return F.one_hot(label.long(), logits.shape[1]).movedim(-1, 1).float()


class DiceCELoss(nn.Module):
    """``ce_weight * CE + dice_weight * (1 - mean soft Dice)`` for one output head.

    Args:
        dice_weight: weight of the Dice term.
        ce_weight: weight of the cross-entropy term.
        batch_dice: see :func:`soft_dice_per_class`.
        include_background: include class 0 in the Dice mean.
        smooth: Dice smoothing.
    """

    def __init__(
        self,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        *,
        batch_dice: bool = False,
        include_background: bool = False,
        smooth: float = DICE_SMOOTH,
    ) -> None:
        super().__init__()
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        self.batch_dice = batch_dice
        self.include_background = include_background
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Loss of (B, K, *spatial) logits against a (B, 1, *spatial) integer label map."""
        target = label[:, 0] if label.ndim == logits.ndim else label
        ce = F.cross_entropy(logits.float(), target.long())
        dice = soft_dice_per_class(
            logits,
            target,
            batch_dice=self.batch_dice,
            include_background=self.include_background or logits.shape[1] == 1,
            smooth=self.smooth,
        )
        return self.ce_weight * ce + self.dice_weight * (1 - dice.mean())


def deep_supervision_weights(num_heads: int, *, drop_lowest: bool = True) -> list[float]:
    """nnU-Net's head weights: 1, 1/2, 1/4, ...; the lowest set to 0 when ``drop_lowest``; sum 1.

    Args:
        num_heads: number of outputs, full resolution first.
        drop_lowest: zero the lowest-resolution head (ignored when there is one head).
    """
    weights = [1.0 / 2**i for i in range(num_heads)]
    if drop_lowest and num_heads > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


def downsample_label(label: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of a (B, 1, *spatial) integer label map to ``shape``."""
    if tuple(label.shape[2:]) == tuple(shape):
        return label
    # float64 carries integer labels exactly; nearest-exact samples voxel centres like nnU-Net's order-0 resize.
    out = F.interpolate(label.double(), size=tuple(shape), mode="nearest-exact")
    return out.to(label.dtype)


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of a per-head loss over deep-supervision outputs.

    Args:
        loss: the loss of one head, ``loss(logits, label)``.
        drop_lowest: see :func:`deep_supervision_weights`.
    """

    def __init__(self, loss: nn.Module, *, drop_lowest: bool = True) -> None:
        super().__init__()
        self.loss = loss
        self.drop_lowest = drop_lowest

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        """Loss of one output tensor, or of a list of heads (full resolution first)."""
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, label)
        weights = deep_supervision_weights(len(outputs), drop_lowest=self.drop_lowest)
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for weight, head in zip(weights, outputs):
            # A zero weight still runs the head so every parameter gets a gradient (DDP needs that).
            total = total + weight * self.loss(head, downsample_label(label, head.shape[2:]))
        return total


def default_loss(cfg: TrainConfig) -> nn.Module:
    """Dice + CE over deep-supervision heads, configured from ``cfg``."""
    head = DiceCELoss(
        cfg.dice_weight, cfg.ce_weight, batch_dice=cfg.batch_dice, include_background=cfg.dice_include_background
    )
    return DeepSupervisionLoss(head, drop_lowest=cfg.ds_drop_lowest)
