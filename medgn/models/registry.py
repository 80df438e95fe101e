"""The model registry: a network is built by name from a :class:`UNet3DConfig` and the data plan.

:func:`register_model` adds a builder under a name, :func:`get_model` looks one up (unknown names
fail listing the registered ones) and :func:`build_model` is what the engine calls: the config gives
the architecture, the plan gives channel counts, strides and kernel sizes. Registered: ``unet3d``
(plain stages; residual when ``cfg.residual``) and ``unet3d_residual`` (residual encoder always).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from torch import nn

from medgn.errors import UsageError
from medgn.layers.conv_norm_act import Size3
from medgn.models.config import UNet3DConfig
from medgn.models.unet import UNet3D

ModelBuilder = Callable[[UNet3DConfig, int, int, Sequence[Size3], Sequence[Size3]], nn.Module]

_REGISTRY: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator registering ``builder(cfg, in_channels, out_channels, strides, kernel_sizes)``.

    Raises:
        ValueError: the name is already registered (a programming error, not a user error).
    """

    def wrap(builder: ModelBuilder) -> ModelBuilder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return wrap


def model_names() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def get_model(name: str) -> ModelBuilder:
    """The builder registered under ``name``.

    Raises:
        UsageError: unknown name (the message lists the registered ones).
    """
    if name not in _REGISTRY:
        raise UsageError(
            "model.name", "unknown model", got=name, expected="one of " + ", ".join(map(repr, model_names()))
        )
    return _REGISTRY[name]


def build_model(
    cfg: UNet3DConfig,
    in_channels: int,
    out_channels: int,
    strides: Sequence[Size3] | None = None,
    kernel_sizes: Sequence[Size3] | None = None,
) -> nn.Module:
    """Build the network ``cfg.name`` for the planned data.

    Args:
        cfg: the architecture section of the run config.
        in_channels: image channels from the dataset.
        out_channels: classes including background.
        strides: per-stage strides from the plan (``None``: 1 then 2).
        kernel_sizes: per-stage kernel sizes from the plan (``None``: 3).
    """
    return get_model(cfg.name)(cfg, in_channels, out_channels, strides, kernel_sizes)  # type: ignore[arg-type]


def _unet(
    cfg: UNet3DConfig,
    in_channels: int,
    out_channels: int,
    strides: Sequence[Size3] | None,
    kernel_sizes: Sequence[Size3] | None,
) -> UNet3D:
    return UNet3D(
        in_channels,
        out_channels,
        features=cfg.features,
        strides=strides,
        kernel_sizes=kernel_sizes,
        norm=cfg.norm,
        activation=cfg.activation,
        residual=cfg.residual,
        deep_supervision=cfg.deep_supervision,
        checkpoint=cfg.checkpoint,
        weight_std=cfg.weight_std,
        memory_format=cfg.memory_format,
        num_groups=cfg.num_groups,
        group_channels=cfg.group_channels,
        n_conv_per_stage=cfg.n_conv_per_stage,
    )


@register_model("unet3d")
def _build_unet3d(
    cfg: UNet3DConfig,
    in_channels: int,
    out_channels: int,
    strides: Sequence[Size3] | None,
    kernel_sizes: Sequence[Size3] | None,
) -> nn.Module:
    return _unet(cfg, in_channels, out_channels, strides, kernel_sizes)


@register_model("unet3d_residual")
def _build_unet3d_residual(
    cfg: UNet3DConfig,
    in_channels: int,
    out_channels: int,
    strides: Sequence[Size3] | None,
    kernel_sizes: Sequence[Size3] | None,
) -> nn.Module:
    return _unet(dataclasses.replace(cfg, residual=True), in_channels, out_channels, strides, kernel_sizes)


__all__ = ["build_model", "get_model", "model_names", "register_model"]
