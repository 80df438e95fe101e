"""Weight-standardized 3D convolution, the companion of GroupNorm at tiny batches.

Weight Standardization (Qiao et al., 2019) normalises each output filter of a convolution to zero
mean and unit variance before it is applied; with GroupNorm it recovers most of the gap to large-batch
BatchNorm. :class:`WSConv3d` is a drop-in ``nn.Conv3d`` (same parameters and state-dict keys): the
stored weight is the raw one, standardised on every forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Added to the filter variance before the square root: small enough to be negligible for trained
# filters (variance ~1e-3..1e-1), large enough to keep a zero-initialised filter finite.
WS_EPS = 1e-5


def standardize_weight(weight: torch.Tensor, eps: float = WS_EPS) -> torch.Tensor:
    """Standardise each output filter of a conv weight to zero mean, unit variance.

    Args:
        weight: (out_ch, in_ch/groups, kd, kh, kw) convolution weight.
        eps: added to the per-filter (biased) variance.

    Returns:
        The standardised weight, same shape and dtype.
    """
    flat = weight.flatten(1)  # (out_ch, in_ch/groups * kd*kh*kw)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()  # statistics of half-precision filters in fp32
    mean = flat.mean(dim=1, keepdim=True)
    var = flat.var(dim=1, unbiased=False, keepdim=True)
    out = (flat - mean) * torch.rsqrt(var + eps)
    return out.view_as(weight).to(weight.dtype)


class WSConv3d(nn.Conv3d):
    """``nn.Conv3d`` whose filters are standardised on every forward (Weight Standardization)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``x`` (N, C, D, H, W) with the standardised weight."""
        w = standardize_weight(self.weight)
        return F.conv3d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


__all__ = ["WS_EPS", "WSConv3d", "standardize_weight"]
