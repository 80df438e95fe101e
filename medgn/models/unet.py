"""The 3D U-Net users train: nnU-Net-style encoder/decoder of conv-GroupNorm-activation blocks.

:class:`UNet3D` has one encoder stage per entry of ``features`` (``n_conv_per_stage`` convolutions,
the first strided to downsample, or residual blocks), a transposed-convolution upsampling per
decoder stage, skip concatenation and a 1x1x1 segmentation head per decoder stage. Strides and
kernel sizes may be anisotropic per stage (the data planner picks them for anisotropic spacing).
In training mode with deep supervision the forward returns every head's logits, full resolution
first; in eval mode it returns the full-resolution logits only. Memory options for batch 1-2:
per-stage activation checkpointing and the channels_last_3d memory format. An input whose spatial
size is not divisible by the total stride is refused with the nearest valid sizes, or padded and
cropped back when ``pad_input=True``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as run_checkpointed

from medgn.errors import ModelError, UsageError
from medgn.layers.conv_norm_act import ConvNormAct3d, ResidualBlock3d, Size3, as_triple

Triple = tuple[int, int, int]
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}
# He initialisation for leaky ReLU with nnU-Net's slope: keeps activation variance ~1 per layer.
HE_NEGATIVE_SLOPE = 1e-2


def _per_stage(value: Sequence[Size3] | None, n: int, default: list[Size3], name: str) -> list[Triple]:
    items = default if value is None else list(value)
    if len(items) != n:
        raise UsageError(
            name, f"needs one entry per stage ({n} stages from features)", got=list(items), expected=f"{n} entries"
        )
    return [as_triple(v, f"{name}[{i}]") for i, v in enumerate(items)]


def _prod(items: Sequence[Triple]) -> Triple:
    return tuple(math.prod(t[a] for t in items) for a in range(3))  # type: ignore[return-value]


class UNet3D(nn.Module):
    """nnU-Net-style 3D U-Net with GroupNorm.

    Args:
        in_channels: image channels (modalities).
        out_channels: segmentation classes including background.
        features: channels per stage, highest resolution first.
        strides: per stage, int or (sd, sh, sw); the first must be 1. Default: 1 then 2.
        kernel_sizes: per stage, odd int or (kd, kh, kw). Default: 3 everywhere.
        norm: norm name (``group``, ``group_torch``, ``batch``, ``instance``, ``layer``, ``none``).
        activation: activation name (``relu``, ``leaky_relu``, ``silu``, ``gelu``).
        residual: residual blocks in the encoder.
        deep_supervision: return all decoder heads in training mode.
        checkpoint: recompute each stage in the backward pass to save activation memory.
        weight_std: weight-standardized convolutions.
        memory_format: ``contiguous`` or ``channels_last_3d``.
        num_groups: groups of every group norm; ``None`` applies the group-count rule.
        group_channels: the rule's channels per group at narrow layers (``None``: the default).
        n_conv_per_stage: convolutions per stage (residual encoders: blocks of two).
        pad_input: pad inputs not divisible by the total stride and crop the outputs back,
            instead of refusing them.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        features: Sequence[int] = (32, 64, 128, 256, 320, 320),
        strides: Sequence[Size3] | None = None,
        kernel_sizes: Sequence[Size3] | None = None,
        norm: str = "group",
        activation: str = "leaky_relu",
        residual: bool = False,
        deep_supervision: bool = True,
        checkpoint: bool = False,
        weight_std: bool = False,
        memory_format: str = "contiguous",
        num_groups: int | None = None,
        group_channels: int | None = None,
        n_conv_per_stage: int = 2,
        pad_input: bool = False,
    ) -> None:
        super().__init__()
        self.features = tuple(int(f) for f in features)
        n = len(self.features)
        if n < 2 or any(f < 1 for f in self.features):
            raise UsageError(
                "features",
                "needs at least two positive stage widths",
                got=list(features),
                expected="e.g. (32, 64, 128)",
            )
        if in_channels < 1 or out_channels < 1:
            raise UsageError("channels", "in/out channels must be positive", got=(in_channels, out_channels))
        if n_conv_per_stage < 1:
            raise UsageError("n_conv_per_stage", "must be at least 1", got=n_conv_per_stage, expected=">= 1")
        if memory_format not in MEMORY_FORMATS:
            raise UsageError(
                "memory_format",
                "unknown memory format",
                got=memory_format,
                expected="one of " + ", ".join(map(repr, MEMORY_FORMATS)),
            )
        self.strides = _per_stage(strides, n, [1] + [2] * (n - 1), "strides")
        self.kernel_sizes = _per_stage(kernel_sizes, n, [3] * n, "kernel_sizes")
        if self.strides[0] != (1, 1, 1):
            raise UsageError("strides[0]", "the first stage keeps full resolution", got=self.strides[0], expected="1")
        if any(k % 2 == 0 for ks in self.kernel_sizes for k in ks):
            raise UsageError(
                "kernel_sizes",
                "kernels must be odd to keep sizes",
                got=self.kernel_sizes,
                expected="odd sizes such as 1 or 3",
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.deep_supervision, self.checkpoint, self.pad_input = deep_supervision, checkpoint, pad_input
        self.memory_format = memory_format
        common = {
            "norm": norm,
            "activation": activation,
            "weight_std": weight_std,
            "num_groups": num_groups,
            "group_channels": group_channels,
        }

        self.encoder = nn.ModuleList()
        prev = in_channels
        for s, (width, stride, kernel) in enumerate(zip(self.features, self.strides, self.kernel_sizes)):
            if residual and s > 0:
                # The stem stays plain (as in ResNet); deeper stages are residual blocks of two convs.
                blocks = [
                    ResidualBlock3d(prev if b == 0 else width, width, kernel, stride if b == 0 else 1, **common)
                    for b in range(max(1, n_conv_per_stage // 2))
                ]
            else:
                blocks = [
                    ConvNormAct3d(prev if c == 0 else width, width, kernel, stride if c == 0 else 1, **common)
                    for c in range(n_conv_per_stage)
                ]
            self.encoder.append(nn.Sequential(*blocks))
            prev = width

        # Decoder stage i upsamples level n-1-i to level n-2-i and fuses the skip there.
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.heads = nn.ModuleList()
        for s in range(n - 1, 0, -1):
            low, high, kernel = self.features[s], self.features[s - 1], self.kernel_sizes[s - 1]
            self.upsample.append(nn.ConvTranspose3d(low, high, self.strides[s], stride=self.strides[s], bias=False))
            convs = [
                ConvNormAct3d(2 * high if c == 0 else high, high, kernel, 1, **common) for c in range(n_conv_per_stage)
            ]
            self.decoder.append(nn.Sequential(*convs))
            self.heads.append(nn.Conv3d(high, out_channels, 1, bias=True))
        self._init_weights()
        self.to(memory_format=MEMORY_FORMATS[memory_format])

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(module.weight, a=HE_NEGATIVE_SLOPE)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def total_stride(self) -> Triple:
        """Product of all stage strides per axis: input sizes must be multiples of it."""
        return _prod(self.strides)

    def valid_size(self, size: Sequence[int]) -> Triple:
        """The smallest spatial size >= ``size`` that the network accepts without padding."""
        return tuple(math.ceil(s / t) * t for s, t in zip(size, self.total_stride))  # type: ignore[return-value]

    def check_input(self, x: torch.Tensor) -> None:
        """Raise :class:`ModelError` when ``x`` cannot go through the network.

        Checks the rank (N, C, D, H, W), the channel count and, unless ``pad_input``, that every
        spatial size is a multiple of :attr:`total_stride` (naming the nearest valid sizes).
        """
        if x.dim() != 5:
            raise ModelError("input", "expected a 5D tensor (N, C, D, H, W)", got=tuple(x.shape))
        if x.shape[1] != self.in_channels:
            raise ModelError(
                "input", "wrong number of input channels", got=int(x.shape[1]), expected=f"{self.in_channels} channels"
            )
        size = tuple(int(s) for s in x.shape[2:])
        stride = self.total_stride
        if self.pad_input or all(s % t == 0 for s, t in zip(size, stride)):
            return
        below = tuple(max(t, (s // t) * t) for s, t in zip(size, stride))
        above = self.valid_size(size)
        raise ModelError(
            "input",
            f"spatial size {size} is not divisible by the total stride {stride}",
            got=size,
            expected=f"multiples of {stride} per axis, nearest {below} or {above} (or pad_input=True)",
        )

    def _run(self, module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.checkpoint and self.training and torch.is_grad_enabled():
            return run_checkpointed(module, *args, use_reentrant=False)
        return module(*args)

    def _decode_stage(self, i: int, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.upsample[i](low)  # (N, features[s-1], *skip spatial)
        return self.decoder[i](torch.cat([up, skip], dim=1))  # cat: (N, 2*features[s-1], ...)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Segment ``x`` of shape (N, in_channels, D, H, W).

        Returns:
            Eval mode or no deep supervision: logits (N, out_channels, D, H, W). Training mode
            with deep supervision: a list of logits, full resolution first, each following one
            at half (per-axis stride) resolution.
        """
        self.check_input(x)
        size = tuple(int(s) for s in x.shape[2:])
        if self.pad_input and self.valid_size(size) != size:
            target = self.valid_size(size)
            # F.pad takes (w_lo, w_hi, h_lo, h_hi, d_lo, d_hi): pad at the end of each axis.
            x = F.pad(x, [p for a in (2, 1, 0) for p in (0, target[a] - size[a])])
        x = x.contiguous(memory_format=MEMORY_FORMATS[self.memory_format])
        skips = []
        for stage in self.encoder:
            x = self._run(stage, x)
            skips.append(x)
        x = skips.pop()
        want_all = self.deep_supervision and self.training
        outputs = []
        for i in range(len(self.decoder)):
            skip = skips.pop()
            if self.checkpoint and self.training and torch.is_grad_enabled():
                x = run_checkpointed(self._decode_stage, i, x, skip, use_reentrant=False)
            else:
                x = self._decode_stage(i, x, skip)
            if want_all or i == len(self.decoder) - 1:
                outputs.append(self.heads[i](x))
        outputs.reverse()  # full resolution first
        if self.pad_input:
            outputs = [self._crop(o, size, level) for level, o in enumerate(outputs)]
        return outputs if want_all else outputs[0]

    def _crop(self, out: torch.Tensor, size: Sequence[int], level: int) -> torch.Tensor:
        stride = _prod(self.strides[: level + 1])
        keep = [math.ceil(s / t) for s, t in zip(size, stride)]
        return out[:, :, : keep[0], : keep[1], : keep[2]]


__all__ = ["UNet3D"]
