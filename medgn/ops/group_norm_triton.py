"""Launchers of the GroupNorm Triton kernels: layouts, split counts, buffers and grids.

The kernels live in ``group_norm_kernels.py`` and are imported inside the launchers, so importing
this file (and medgn.ops) never imports triton. A tensor reaches the kernels as an (N, C, S) view
with strides (sn, sc, ss): contiguous gives (C*S, S, 1) and channels_last(_3d) gives (S*C, 1, C), so
both layouts are read in place; any other layout is copied to contiguous first.
"""

from __future__ import annotations

import math

import torch

__all__ = ["alloc_like", "kernel_strides"]


def _channels_last_format(t: torch.Tensor) -> torch.memory_format | None:
    """The channels-last memory format for t's rank, or None for ranks without one."""
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())


def _is_channels_last(t: torch.Tensor) -> bool:
    """True when t is dense channels-last (and not also plain contiguous)."""
    fmt = _channels_last_format(t)
    return fmt is not None and not t.is_contiguous() and t.is_contiguous(memory_format=fmt)


def alloc_like(t: torch.Tensor) -> torch.Tensor:
    """An empty tensor of t's shape and dtype, channels-last when t is, else contiguous."""
    fmt = _channels_last_format(t) if _is_channels_last(t) else torch.contiguous_format
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=fmt)


def kernel_strides(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """Return (t or a contiguous copy, sn, sc, ss): element strides of t seen as (N, C, S)."""
    n, c = t.shape[:2]
    s = math.prod(t.shape[2:])
    if _is_channels_last(t):
        return t, s * c, 1, c
    t = t.contiguous()
    return t, c * s, s, 1
