"""The U-Net building blocks: conv -> norm -> activation, and a residual block of two of them.

:class:`ConvNormAct3d` is a 3D convolution (optionally weight-standardized) followed by a norm and an
activation chosen by name. With ``norm="group"`` (or ``"layer"``) the activation and an optional
residual add run inside medgn's fused GroupNorm (one pass over memory); with any other norm they are
separate modules. State-dict keys are ``conv.*`` and ``norm.*`` for every norm choice, so weights
trained with ``"group_torch"`` load into a ``"group"`` network. :class:`ResidualBlock3d` chains two
of them and adds a skip (identity, or a 1x1x1 strided projection with a norm when the shape changes)
through the second block's norm before its activation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medgn.errors import UsageError
from medgn.layers.factories import fuses_activation, make_activation, make_norm
from medgn.layers.weight_std import WSConv3d

Size3 = int | Sequence[int]


def as_triple(value: Size3, name: str) -> tuple[int, int, int]:
    """Turn an int or a 3-sequence into a ``(d, h, w)`` tuple of positive ints.

    Raises:
        UsageError: not an int or a sequence of three positive ints.
    """
    items = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(items) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in items):
        raise UsageError(
            name, "must be a positive int or three positive ints", got=value, expected="e.g. 3 or (1, 3, 3)"
        )
    return items  # type: ignore[return-value]


class ConvNormAct3d(nn.Module):
    """Conv3d -> norm -> activation, with the activation fused into GroupNorm when possible.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        kernel_size: int or (kd, kh, kw); padding keeps the size ("same" for stride 1).
        stride: int or (sd, sh, sw).
        norm: norm name (see :func:`~medgn.layers.factories.make_norm`).
        activation: activation name, or ``None``/``"none"`` for no activation.
        weight_std: use a weight-standardized convolution.
        num_groups: groups for group norms; ``None`` applies the group-count rule.
        group_channels: the rule's channels per group (``None``: the default).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: Size3 = 3,
        stride: Size3 = 1,
        norm: str = "group",
        activation: str | None = "leaky_relu",
        weight_std: bool = False,
        num_groups: int | None = None,
        group_channels: int | None = None,
    ) -> None:
        super().__init__()
        kernel = as_triple(kernel_size, "kernel_size")
        strides = as_triple(stride, "stride")
        activation = None if activation == "none" else activation
        self.fused = fuses_activation(norm)
        conv_cls = WSConv3d if weight_std else nn.Conv3d
        # A norm with a shift makes a conv bias redundant; keep it only when there is no norm.
        self.conv = conv_cls(
            in_ch,
            out_ch,
            kernel,
            stride=strides,
            padding=tuple(k // 2 for k in kernel),
            bias=norm == "none",
        )
        self.norm = make_norm(norm, out_ch, num_groups, activation if self.fused else None, group_channels)
        self.act = nn.Identity() if self.fused else make_activation(activation)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Return ``act(norm(conv(x)) + residual)``.

        Args:
            x: (N, in_ch, D, H, W).
            residual: optional tensor shaped like the output, added after the norm and before
                the activation (fused into GroupNorm for ``norm="group"``).
        """
        y = self.conv(x)  # (N, out_ch, D', H', W')
        if self.fused:
            return self.norm(y, residual=residual) if residual is not None else self.norm(y)
        y = self.norm(y)
        if residual is not None:
            y = y + residual
        return self.act(y)


class ResidualBlock3d(nn.Module):
    """Two :class:`ConvNormAct3d` with a skip added before the second activation.

    The skip is the identity when input and output shapes agree, otherwise a 1x1x1 convolution with
    the block's stride followed by a norm (no activation), as in ResNet's projection shortcut.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        kernel_size: kernel of both convolutions.
        stride: stride of the first convolution (and of the projection).
        norm: norm name.
        activation: activation name.
        weight_std: weight-standardized convolutions.
        num_groups: groups for group norms; ``None`` applies the rule.
        group_channels: the rule's channels per group (``None``: the default).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: Size3 = 3,
        stride: Size3 = 1,
        norm: str = "group",
        activation: str | None = "leaky_relu",
        weight_std: bool = False,
        num_groups: int | None = None,
        group_channels: int | None = None,
    ) -> None:
        super().__init__()
        strides = as_triple(stride, "stride")
        g = (num_groups, group_channels)
        self.conv1 = ConvNormAct3d(in_ch, out_ch, kernel_size, strides, norm, activation, weight_std, *g)
        self.conv2 = ConvNormAct3d(out_ch, out_ch, kernel_size, 1, norm, activation, weight_std, *g)
        self.skip: nn.Module
        if in_ch == out_ch and strides == (1, 1, 1):
            self.skip = nn.Identity()
        else:
            self.skip = ConvNormAct3d(in_ch, out_ch, 1, strides, norm, None, weight_std, *g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``act(norm(conv2(conv1(x))) + skip(x))`` for x of shape (N, in_ch, D, H, W)."""
        return self.conv2(self.conv1(x), residual=self.skip(x))


__all__ = ["ConvNormAct3d", "ResidualBlock3d", "as_triple"]
