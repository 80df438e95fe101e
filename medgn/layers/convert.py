"""Replacing BatchNorm / InstanceNorm layers in any model by GroupNorm.

:func:`convert_norm` walks a model (medgn's own, or a MONAI ``SegResNet``/``UNet``/``DynUNet``,
or any ``nn.Module``), replaces every ``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and
``InstanceNorm1d/2d/3d`` with a GroupNorm of the same width, copies the affine scale and shift when
the old layer has them, and reports each replacement. Running statistics are dropped: GroupNorm
normalises each sample by its own statistics, which is the point of converting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from medgn.errors import UsageError
from medgn.layers.group_norm import GroupNorm
from medgn.layers.group_rule import groups_for_width

# Every layer whose statistics depend on the batch or on one channel only.
CONVERTIBLE: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,  # BatchNorm1d/2d/3d, SyncBatchNorm, LazyBatchNorm*
    nn.modules.instancenorm._InstanceNorm,  # InstanceNorm1d/2d/3d
)

Target = Literal["group", "group_torch"]
TARGETS: tuple[str, ...] = ("group", "group_torch")


@dataclass(frozen=True)
class Replacement:
    """One layer replaced by :func:`convert_norm`.

    Attributes:
        name: qualified module name in the model (``""`` for the model itself).
        old: description of the replaced layer, e.g. ``"BatchNorm3d(64)"``.
        new: description of the new layer, e.g. ``"GroupNorm(4, 64)"``.
        copied_affine: whether the old scale and shift were copied.
    """

    name: str
    old: str
    new: str
    copied_affine: bool

    def __str__(self) -> str:
        return f"{self.name or '<model>'}: {self.old} -> {self.new}"


def _make_group_norm(old: nn.Module, to: str, groups: int) -> nn.Module:
    channels = int(old.num_features)  # type: ignore[arg-type]
    affine = bool(getattr(old, "affine", False))
    eps = float(old.eps)  # type: ignore[arg-type]
    if to == "group":
        return GroupNorm(groups, channels, eps=eps, affine=affine)
    return nn.GroupNorm(groups, channels, eps=eps, affine=affine)


def convert_norm(
    module: nn.Module,
    to: Target = "group",
    num_groups: int | None = 32,
) -> tuple[nn.Module, list[Replacement]]:
    """Replace every BatchNorm/InstanceNorm (1d/2d/3d) in ``module`` with GroupNorm.

    Args:
        module: the model, changed in place (its root is returned, replaced when it is itself a norm).
        to: ``"group"`` for medgn's GroupNorm, ``"group_torch"`` for ``nn.GroupNorm``.
        num_groups: wanted groups per layer (32 in the paper); the largest divisor of the width
            not above it is used. ``None`` applies the group-count rule
            (:func:`~medgn.layers.group_rule.num_groups_for`).

    Returns:
        ``(model, replacements)``: the converted model and one :class:`Replacement` per layer.

    Raises:
        UsageError: ``to`` is not a known target or ``num_groups`` is below 1.
    """
    if to not in TARGETS:
        raise UsageError("to", "unknown conversion target", got=to, expected="one of " + ", ".join(map(repr, TARGETS)))
    found = [(name, sub) for name, sub in module.named_modules() if isinstance(sub, CONVERTIBLE)]
    replacements: list[Replacement] = []
    root = module
    for name, old in found:
        groups = groups_for_width(int(old.num_features), num_groups)  # type: ignore[arg-type]
        new = _make_group_norm(old, to, groups)
        copied = False
        ref = old.weight if getattr(old, "weight", None) is not None else None
        if ref is not None and not isinstance(ref, nn.parameter.UninitializedParameter):
            new.to(device=ref.device, dtype=ref.dtype)
            with torch.no_grad():
                new.weight.copy_(old.weight)  # type: ignore[union-attr]
                new.bias.copy_(old.bias)  # type: ignore[union-attr]
            copied = True
        new.train(old.training)
        replacements.append(Replacement(name, _describe(old), _describe(new), copied))
        if not name:
            root = new
            continue
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, new)
    return root, replacements


def _describe(layer: nn.Module) -> str:
    if isinstance(layer, nn.GroupNorm) or type(layer).__name__ == "GroupNorm":
        return f"{type(layer).__name__}({layer.num_groups}, {layer.num_channels})"
    return f"{type(layer).__name__}({layer.num_features})"


__all__ = ["CONVERTIBLE", "Replacement", "convert_norm", "groups_for_width"]
