"""The GroupNorm layer: a drop-in for ``nn.GroupNorm`` with a fused activation and residual add.

Same argument order, defaults, initialisation (weight ones, bias zeros), parameter names and
state_dict keys as ``nn.GroupNorm`` (it subclasses it), so checkpoints move both ways; the extra
keyword-only arguments choose the fused activation and the backend of ``medgn.ops.group_norm``.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from medgn.ops.group_norm import BACKENDS, group_norm
from medgn.ops.group_norm_ref import ACTIVATIONS

__all__ = ["GroupNorm"]

# nn.GroupNorm takes the keyword ``bias`` from torch 2.12 on; on 2.10 and 2.11 the layer builds
# the bias itself and drops it when bias=False, as the newer torch does.
_BASE_TAKES_BIAS = "bias" in inspect.signature(nn.GroupNorm.__init__).parameters


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` plus an optional fused activation and residual add.

    Args:
        num_groups: G, a divisor of num_channels (see ``medgn.layers.group_rule.num_groups_for``).
        num_channels: C, channels of the input.
        eps: added to the variance before the square root.
        affine: learn a per-channel weight (init 1) and bias (init 0).
        bias: with affine, also learn the bias (nn.GroupNorm's keyword-only ``bias``).
        activation: None/"none", "relu", "leaky_relu", "silu" or "gelu", applied after the affine
            and the residual add.
        negative_slope: slope of "leaky_relu" for negative inputs.
        backend: "auto", "triton" or "torch" (see ``medgn.ops.group_norm``).
        device: device of the parameters.
        dtype: dtype of the parameters.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        *,
        bias: bool = True,
        activation: str | None = None,
        negative_slope: float = 0.01,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        act = "none" if activation is None else activation
        if act not in ACTIVATIONS:
            raise ValueError(f"GroupNorm: unknown activation {activation!r}, expected None or one of {ACTIVATIONS}")
        if backend not in BACKENDS:
            raise ValueError(f"GroupNorm: unknown backend {backend!r}, expected one of {BACKENDS}")
        if _BASE_TAKES_BIAS:
            super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype, bias=bias)
        else:
            super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
            if affine and not bias:
                self.register_parameter("bias", None)
        self.activation = act
        self.negative_slope = float(negative_slope)
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Normalise x, apply the affine, add ``residual`` (x's shape) if given, then activate."""
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(
                f"GroupNorm: input of shape {tuple(x.shape)} has the wrong channel count, expected "
                f"(N, {self.num_channels}, ...) for this layer"
            )
        return group_norm(
            x,
            self.num_groups,
            self.weight,
            self.bias,
            self.eps,
            activation=self.activation,
            residual=residual,
            negative_slope=self.negative_slope,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        """nn.GroupNorm's repr plus the activation and backend when they are not the defaults."""
        text = super().extra_repr()
        if self.activation != "none":
            text += f", activation={self.activation}"
            if self.activation == "leaky_relu":
                text += f", negative_slope={self.negative_slope}"
        if self.backend != "auto":
            text += f", backend={self.backend}"
        return text
