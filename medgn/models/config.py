"""The network's configuration: the architecture choices a YAML config sets.

:class:`UNet3DConfig` is the ``model:`` section of a run config. It holds what a user chooses
(widths, norm, activation, residual stages, deep supervision, memory options); the strides, kernel
sizes and the input/output channel counts come from the data plan and are passed to
:func:`medgn.models.registry.build_model` at build time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

NormName = Literal["group", "group_torch", "batch", "instance", "layer", "none"]
ActivationName = Literal["relu", "leaky_relu", "silu", "gelu"]
MemoryFormat = Literal["contiguous", "channels_last_3d"]
# A stage halves the patch; 10 stages take a 1024-voxel axis (the largest patch) down to 1.
MAX_STAGES = 10


@dataclass(frozen=True)
class UNet3DConfig:
    """Architecture of a 3D U-Net (see :class:`medgn.models.unet.UNet3D`).

    Attributes:
        name: registered model name (``unet3d`` or ``unet3d_residual``).
        features: channels per resolution stage, highest resolution first; nnU-Net's widths
            (32 doubling to a cap of 320) by default.
        norm: normalization layer name.
        activation: activation name.
        residual: residual encoder stages.
        deep_supervision: return lower-resolution heads during training.
        checkpoint: recompute each stage in the backward pass (activation checkpointing).
        weight_std: weight-standardized convolutions.
        memory_format: ``channels_last_3d`` keeps activations in NDHWC order.
        num_groups: groups of every group norm; null applies the group-count rule.
        group_channels: the group-count rule's channels per group at narrow layers; null is medgn's
            default (1: G = min(32, C), from the LA2018 norm study).
        n_conv_per_stage: convolutions per encoder and decoder stage (2 as in nnU-Net).
    """

    name: str = "unet3d"
    # 1..4096 channels a stage (nnU-Net caps at 320; 4096 is a 3D convolution of 450M weights), at
    # most MAX_STAGES stages.
    features: tuple[int, ...] = field(default=(32, 64, 128, 256, 320, 320), metadata={"min": 1, "max": 4096})
    norm: NormName = "group"
    activation: ActivationName = "leaky_relu"
    residual: bool = False
    deep_supervision: bool = True
    checkpoint: bool = False
    weight_std: bool = False
    memory_format: MemoryFormat = "contiguous"
    # 1..512: every group needs at least one channel of the widest (512-channel) layers.
    num_groups: int | None = field(default=None, metadata={"min": 1, "max": 512})
    # 1..512 channels per group: 1 is InstanceNorm at every layer narrower than 32 x 1 channels.
    group_channels: int | None = field(default=None, metadata={"min": 1, "max": 512})
    # 1..4: one conv per stage is the smallest U-Net, beyond 4 nnU-Net reports no gain.
    n_conv_per_stage: int = field(default=2, metadata={"min": 1, "max": 4})

    def __post_init__(self) -> None:
        # ValueError here becomes a UsageError naming the section in configtools.build.
        if not 2 <= len(self.features) <= MAX_STAGES:
            shown = list(self.features) if len(self.features) <= 2 * MAX_STAGES else f"{len(self.features)} widths"
            raise ValueError(f"features needs 2 to {MAX_STAGES} stages, got {shown}")
        if any(f < 1 for f in self.features):
            raise ValueError(f"features must be positive, got {list(self.features)}")


__all__ = ["ActivationName", "MemoryFormat", "NormName", "UNet3DConfig"]
