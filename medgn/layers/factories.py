"""Normalization and activation layers chosen by name.

The network code never names a layer class: it asks :func:`make_norm` for ``"group"`` (medgn's
fused :class:`~medgn.layers.group_norm.GroupNorm` with the paper's group-count rule),
``"group_torch"`` (``nn.GroupNorm``, for comparison), ``"batch"``, ``"instance"``, ``"layer"``
(GroupNorm with one group) or ``"none"``, and :func:`make_activation` for ``"relu"``,
``"leaky_relu"``, ``"silu"`` or ``"gelu"``. Both are registry dictionaries, so a new choice is one
entry; unknown names raise :class:`~medgn.errors.UsageError` listing the valid ones. Only
``"group"`` can fuse the activation into the normalization (see :data:`FUSING_NORMS`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from medgn.errors import UsageError
from medgn.layers.group_norm import GroupNorm
from medgn.layers.group_rule import resolve_groups

# The paper's default slope for LeakyReLU in nnU-Net-style networks; the fused GroupNorm takes the
# same value so "group" and "group_torch" compute the same function.
LEAKY_SLOPE = 0.01
# PyTorch's default epsilon for every normalization layer; kept so state dicts and outputs match
# nn.GroupNorm / nn.BatchNorm3d exactly.
NORM_EPS = 1e-5

ActivationFactory = Callable[[], nn.Module]

ACTIVATIONS: dict[str, ActivationFactory] = {
    "relu": lambda: nn.ReLU(),
    "leaky_relu": lambda: nn.LeakyReLU(LEAKY_SLOPE),
    "silu": lambda: nn.SiLU(),
    "gelu": lambda: nn.GELU(),
}


def _check_name(kind: str, name: str, valid: dict[str, object]) -> None:
    if name not in valid:
        raise UsageError(
            kind,
            f"unknown {kind} name",
            got=name,
            expected="one of " + ", ".join(repr(k) for k in sorted(valid)),
        )


def make_activation(name: str | None) -> nn.Module:
    """Build an activation module by name.

    Args:
        name: one of ``relu``, ``leaky_relu`` (slope 0.01), ``silu``, ``gelu``; ``None`` or
            ``"none"`` gives ``nn.Identity``.

    Returns:
        A fresh activation module (never in-place, so autograd saves what it needs).

    Raises:
        UsageError: the name is not a known activation.
    """
    if name is None or name == "none":
        return nn.Identity()
    _check_name("activation", name, ACTIVATIONS)
    return ACTIVATIONS[name]()


def _group(channels: int, num_groups: int | None, activation: str | None) -> nn.Module:
    return GroupNorm(
        num_groups,
        channels,
        eps=NORM_EPS,
        activation=activation,
        negative_slope=LEAKY_SLOPE,
    )


def _group_torch(channels: int, num_groups: int | None, activation: str | None) -> nn.Module:
    return nn.GroupNorm(num_groups, channels, eps=NORM_EPS)


def _layer(channels: int, num_groups: int | None, activation: str | None) -> nn.Module:
    # LayerNorm over (C, D, H, W) per sample is GroupNorm with a single group (paper, Fig. 2).
    return GroupNorm(1, channels, eps=NORM_EPS, activation=activation, negative_slope=LEAKY_SLOPE)


def _batch(channels: int, num_groups: int | None, activation: str | None) -> nn.Module:
    return nn.BatchNorm3d(channels, eps=NORM_EPS)


def _instance(channels: int, num_groups: int | None, activation: str | None) -> nn.Module:
    # affine=True like nnU-Net's InstanceNorm, so every norm choice has a learnable scale and shift.
    return nn.InstanceNorm3d(channels, eps=NORM_EPS, affine=True)


def _none(channels: int, num_groups: int | None, activation: str | None) -> nn.Module:
    return nn.Identity()


NormFactory = Callable[[int, "int | None", "str | None"], nn.Module]

NORMS: dict[str, NormFactory] = {
    "group": _group,
    "group_torch": _group_torch,
    "batch": _batch,
    "instance": _instance,
    "layer": _layer,
    "none": _none,
}

# Norms whose module applies the activation (and a residual add) itself: medgn's GroupNorm.
FUSING_NORMS: frozenset[str] = frozenset({"group", "layer"})


def fuses_activation(norm: str) -> bool:
    """Whether ``make_norm(norm, ..., activation=a)`` applies ``a`` inside the norm module."""
    _check_name("norm", norm, NORMS)
    return norm in FUSING_NORMS


def make_norm(
    name: str,
    channels: int,
    num_groups: int | None = None,
    activation: str | None = None,
    group_channels: int | None = None,
) -> nn.Module:
    """Build a normalization layer for ``channels`` feature maps by name.

    Args:
        name: one of ``group``, ``group_torch``, ``batch``, ``instance``, ``layer``, ``none``.
        channels: number of channels C of the (N, C, D, H, W) input.
        num_groups: groups for ``group``/``group_torch`` (a count that does not divide
            ``channels`` becomes the largest divisor below it); ``None`` applies the group-count
            rule (:func:`~medgn.layers.group_rule.resolve_groups`: 32 groups, fewer at narrow
            layers so each group has ``group_channels`` channels).
        activation: activation name applied after the norm. Fused into the module for norms in
            :data:`FUSING_NORMS`; for the others the result is ``nn.Sequential(norm, act)``.
        group_channels: the rule's channels per group (default
            :data:`~medgn.layers.group_rule.DEFAULT_CHANNELS_PER_GROUP`).

    Returns:
        The normalization module (with the activation when one was asked for).

    Raises:
        UsageError: unknown norm or activation name, or ``num_groups`` below 1.
    """
    _check_name("norm", name, NORMS)
    if activation == "none":
        activation = None
    if activation is not None:
        _check_name("activation", activation, ACTIVATIONS)
    if channels < 1:
        raise UsageError("channels", "a norm needs at least one channel", got=channels, expected=">= 1")
    fused = name in FUSING_NORMS
    if name in ("group", "group_torch"):
        try:
            num_groups = resolve_groups(channels, num_groups, group_channels)
        except ValueError as exc:
            raise UsageError(
                "num_groups", str(exc), got=num_groups, expected="a positive group count, or null for the rule"
            ) from None
    norm = NORMS[name](channels, num_groups, activation if fused else None)
    if activation is None or fused:
        return norm
    return nn.Sequential(norm, make_activation(activation))


__all__ = [
    "ACTIVATIONS",
    "FUSING_NORMS",
    "NORMS",
    "fuses_activation",
    "make_activation",
    "make_norm",
]
