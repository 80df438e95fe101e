"""The GroupNorm specification: argument checks and a pure-PyTorch reference (also the CPU path).

``y = act(group_norm(x) * gamma + beta + residual)`` with statistics in float32 (float64 for
float64 input), the biased variance of each (sample, group), and the output in the input dtype.
The Triton kernels in ``group_norm_triton.py`` are tested against this file; every backend shares
the argument checks in :func:`check_group_norm_args`, so they fail the same way on bad input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "SUPPORTED_DTYPES", "check_group_norm_args", "group_norm_ref"]

#: Activation names accepted by every GroupNorm entry point ("none" is also spelled None).
ACTIVATIONS: tuple[str, ...] = ("none", "relu", "leaky_relu", "silu", "gelu")

#: Input dtypes of the reference; the Triton path takes the first three.
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
)


def _check_param(name: str, t: torch.Tensor | None, channels: int) -> None:
    """Raise when a per-channel parameter is not a floating tensor of shape (C,)."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"group_norm: {name} must be a tensor of shape ({channels},) or None, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != channels:
        raise ValueError(
            f"group_norm: {name} has shape {tuple(t.shape)}, expected ({channels},), one value per "
            "channel of x; build it with the layer's num_channels"
        )
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"group_norm: {name} has dtype {t.dtype}, expected one of {SUPPORTED_DTYPES}")


def check_group_norm_args(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str | None,
    residual: torch.Tensor | None,
    negative_slope: float,
) -> str:
    """Validate GroupNorm arguments; return the activation name normalised ("none" for None).

    Raises:
        TypeError: x, weight, bias or residual is not a tensor of a supported dtype.
        ValueError: wrong rank, channels not divisible by groups, wrong parameter or residual shape,
            an unknown activation or a non-positive eps; the message says how to fix it.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"group_norm: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"group_norm: x has dtype {x.dtype}, expected one of {SUPPORTED_DTYPES}; cast it with "
            "x.float() (or .half()/.bfloat16())"
        )
    if x.dim() not in (3, 4, 5):
        raise ValueError(
            f"group_norm: x has shape {tuple(x.shape)} (rank {x.dim()}), expected rank 3, 4 or 5: "
            "(N, C, L), (N, C, H, W) or (N, C, D, H, W); add a batch dimension with x[None]"
        )
    channels = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"group_norm: num_groups must be a positive integer, got {num_groups!r}")
    if channels % num_groups:
        raise ValueError(
            f"group_norm: {channels} channels are not divisible by num_groups={num_groups}; use a "
            "divisor of the channel count (medgn.layers.group_rule.num_groups_for picks one)"
        )
    _check_param("weight", weight, channels)
    _check_param("bias", bias, channels)
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"group_norm: eps must be a finite number > 0, got {eps!r} (1e-5 is usual)")
    if not isinstance(negative_slope, (int, float)) or not math.isfinite(negative_slope):
        raise ValueError(f"group_norm: negative_slope must be a finite number, got {negative_slope!r}")
    act = "none" if activation is None else activation
    if act not in ACTIVATIONS:
        raise ValueError(f"group_norm: unknown activation {activation!r}, expected None or one of {ACTIVATIONS}")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"group_norm: residual must be a tensor or None, got {type(residual).__name__}")
        if residual.shape != x.shape:
            raise ValueError(
                f"group_norm: residual has shape {tuple(residual.shape)}, expected x's shape "
                f"{tuple(x.shape)}; the residual is added element-wise before the activation"
            )
        if residual.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"group_norm: residual has dtype {residual.dtype}, expected one of {SUPPORTED_DTYPES}")
    return act


def apply_activation(z: torch.Tensor, activation: str, negative_slope: float) -> torch.Tensor:
    """Apply the named activation to ``z`` ("gelu" is the exact erf form, torch's default)."""
    if activation == "relu":
        return F.relu(z)
    if activation == "leaky_relu":
        return F.leaky_relu(z, negative_slope)
    if activation == "silu":
        return F.silu(z)
    if activation == "gelu":
        return F.gelu(z)
    return z


def group_norm_ref(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """GroupNorm with a fused activation and residual, in plain PyTorch (differentiable).

    Computes ``act((x - mean) * rstd * weight + bias + residual)`` per (sample, group), with the
    mean and biased variance over the group's channels and positions.

    Args:
        x: (N, C, *spatial) input, rank 3-5, float32/bfloat16/float16/float64.
        num_groups: G, a divisor of C.
        weight: per-channel scale gamma of shape (C,), or None for ones.
        bias: per-channel shift beta of shape (C,), or None for zeros.
        eps: added to the variance before the square root.
        activation: None/"none", "relu", "leaky_relu", "silu" or "gelu".
        residual: tensor of x's shape added before the activation, or None.
        negative_slope: slope of "leaky_relu" for negative inputs.

    Returns:
        y of x's shape and dtype; statistics and arithmetic in float32 (float64 for float64 x).
    """
    act = check_group_norm_args(x, num_groups, weight, bias, eps, activation, residual, negative_slope)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    n, c = x.shape[:2]
    xg = x.to(compute).reshape(n, num_groups, -1)  # (N, G, C//G * spatial)
    mean = xg.mean(dim=2, keepdim=True)
    var = (xg - mean).square().mean(dim=2, keepdim=True)  # biased, centred: never E[x^2]-E[x]^2
    z = ((xg - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        z = z * weight.to(compute).reshape(shape)
    if bias is not None:
        z = z + bias.to(compute).reshape(shape)
    if residual is not None:
        z = z + residual.to(compute)
    return apply_activation(z, act, negative_slope).to(x.dtype)
