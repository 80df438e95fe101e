"""Launchers of the GroupNorm Triton kernels: layouts, split counts, buffers and grids.

The kernels live in ``group_norm_kernels.py`` and are imported inside the launchers, so importing
this file (and medgn.ops) never imports triton. A tensor reaches the kernels as an (N, C, S) view
with strides (sn, sc, ss): contiguous gives (C*S, S, 1) and channels_last(_3d) gives (S*C, 1, C), so
both layouts are read in place; any other layout is copied to contiguous first.

Which kernels run (fused, split or chunked), with which tiles, and the bytes each path moves are
decided in ``group_norm_plan.py``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from medgn.ops.group_norm_plan import (
    _STAGES,
    _channels_last_format,
    _is_channels_last,
    _plan,
    _warps,
    backward_path,
    forward_path,
    fused_launch_block,
    moved_volumes,
    planned_volumes,
)

__all__ = [
    "alloc_like",
    "backward_path",
    "forward_path",
    "group_norm_backward",
    "group_norm_forward",
    "kernel_strides",
    "moved_volumes",
    "planned_volumes",
]

_ACT_CODES = {"none": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu": 4}


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


def _dense(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.contiguous() if t is not None else None


def on_device(x: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    """``x``'s GPU as the current device: Triton launches on the current device and its stream, so a
    tensor on ``cuda:1`` while ``cuda:0`` is current would be read from the wrong GPU."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


F = TypeVar("F", bound=Callable[..., Any])


def _on_input_device(fn: F) -> F:
    """Run ``fn(tensor, ...)`` with its first argument's GPU as the current device."""

    @functools.wraps(fn)
    def run(first: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        with on_device(first):
            return fn(first, *args, **kwargs)

    return run  # type: ignore[return-value]


def _flags(weight: torch.Tensor | None, bias: torch.Tensor | None, residual: torch.Tensor | None,
           activation: str) -> dict[str, int | bool]:  # fmt: skip
    return {
        "HAS_W": weight is not None,
        "HAS_B": bias is not None,
        "HAS_R": residual is not None,
        "ACT": _ACT_CODES[activation],
    }


@_on_input_device
def group_norm_forward(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str,
    residual: torch.Tensor | None,
    negative_slope: float,
    *,
    path: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the forward kernels; return (y, mean, rstd) with fp32 (N, G) statistics.

    Arguments are those of ``medgn.ops.group_norm`` (already checked). ``path`` is one of
    ``group_norm_plan.PATHS`` (see that module); "fused" needs the group to fit on chip.
    """
    from medgn.ops import group_norm_kernels as k

    n = x.shape[0]
    if x.numel() == 0:  # an empty batch or volume: nothing to launch
        stats = torch.zeros((n, num_groups), dtype=torch.float32, device=x.device)
        return alloc_like(x), stats, torch.ones_like(stats)
    path = forward_path(x, num_groups, path)
    weight, bias = _dense(weight), _dense(bias)  # the kernels read them as contiguous vectors
    y = alloc_like(x)
    x, sxn, sxc, sxs = kernel_strides(x)
    r, srn, src, srs = kernel_strides(residual) if residual is not None else (x, 0, 0, 0)
    mean = torch.empty((n, num_groups), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    flags = _flags(weight, bias, residual, activation)
    w = weight if weight is not None else x
    b = bias if bias is not None else x
    s = math.prod(x.shape[2:])
    count = float((x.shape[1] // num_groups) * s)  # elements per group, as a float (no int32)
    if path == "fused":
        gpb, block_c, block_s = fused_launch_block(x, num_groups, "fwd")
        k._fused_kernel[(n * num_groups // gpb,)](
            x, y, w, b, r, mean, rstd,
            s, num_groups, x.shape[1] // num_groups, sxn, sxc, sxs, srn, src, srs, count, eps,
            negative_slope, GPB=gpb, BLOCK_C=block_c, BLOCK_S=block_s,
            num_warps=_warps(gpb * block_c * block_s), **flags,
        )  # fmt: skip
        return y, mean, rstd
    p = _plan(x, num_groups, 1, chunked=path == "chunked")
    mean_p = torch.empty((n * num_groups, p.SPLITS), dtype=torch.float32, device=x.device)
    m2_p = torch.empty_like(mean_p)
    for row0 in range(0, p.rows, p.chunk_rows):
        grid = (min(p.chunk_rows, p.rows - row0), p.SPLITS)
        k._stats_kernel[grid](
            x, mean_p, m2_p, row0, p.S, num_groups, p.CPG, sxn, sxc, sxs, p.S_PER_SPLIT,
            p.SPLITS, GPB=p.GPB, BLOCK_C=p.BLOCK_C, BLOCK_S=p.BLOCK_S, STAGES=_STAGES,
            num_warps=p.warps,
        )  # fmt: skip
        k._apply_kernel[grid](
            x, y, w, b, r, mean_p, m2_p, mean, rstd, row0,
            p.S, num_groups, p.CPG, sxn, sxc, sxs, srn, src, srs, p.S_PER_SPLIT,
            p.SPLITS, eps, negative_slope, GPB=p.GPB, SPLITS_P2=p.SPLITS_P2, BLOCK_C=p.BLOCK_C,
            BLOCK_S=p.BLOCK_S, STAGES=_STAGES, num_warps=p.warps, **flags,
        )  # fmt: skip
    return y, mean, rstd


@_on_input_device
def group_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    activation: str,
    negative_slope: float,
    need_dres: bool,
    *,
    path: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the backward kernels; return (dx, dweight, dbias, dresidual).

    dweight/dbias are empty (0,) tensors when weight/bias is None, and dresidual is empty unless
    ``need_dres`` and a residual was given. dweight/dbias are fixed-order sums inside the kernels
    (see ``group_norm_kernels_bwd``), so they are deterministic.
    """
    from medgn.ops import group_norm_kernels_bwd as kb

    n, c = x.shape[:2]
    if x.numel() == 0:  # an empty batch or volume: no gradient flows, dW and dB are 0
        dw = torch.zeros_like(weight) if weight is not None else x.new_empty((0,))
        db = torch.zeros_like(bias) if bias is not None else x.new_empty((0,))
        dres = alloc_like(residual) if need_dres and residual is not None else x.new_empty((0,))
        return alloc_like(x), dw, db, dres
    path = backward_path(x, num_groups, path)
    weight, bias = _dense(weight), _dense(bias)
    dx = alloc_like(x)
    x, sxn, sxc, sxs = kernel_strides(x)
    # The kernels read dy with x's strides: give dy x's memory format (a no-op when it has it).
    fmt = _channels_last_format(x) if _is_channels_last(x) else torch.contiguous_format
    dy = dy.contiguous(memory_format=fmt)
    has_dr = need_dres and residual is not None
    dres = alloc_like(residual) if has_dr else x.new_empty((0,))
    r, srn, src, srs = kernel_strides(residual) if residual is not None else (x, 0, 0, 0)
    flags = _flags(weight, bias, residual, activation)
    w = weight if weight is not None else x
    b = bias if bias is not None else x
    # Absent gradients are distinct empty tensors: custom-op outputs may not alias each other.
    dw = torch.empty_like(weight) if weight is not None else x.new_empty((0,))
    db = torch.empty_like(bias) if bias is not None else x.new_empty((0,))
    s = math.prod(x.shape[2:])
    cpg = c // num_groups
    count = float(cpg * s)
    if path == "fused":
        gpb, block_c, block_s = fused_launch_block(x, num_groups, "bwd")
        kb._bwd_fused_kernel[(num_groups // gpb,)](
            x, dy, dx, w, b, r, dres if has_dr else x, dw, db, mean, rstd,
            n, s, num_groups, cpg, sxn, sxc, sxs, srn, src, srs, count, negative_slope,
            HAS_DR=has_dr, GPB=gpb, BLOCK_C=block_c, BLOCK_S=block_s,
            num_warps=_warps(gpb * block_c * block_s), **flags,
        )  # fmt: skip
        return dx, dw, db, dres
    reread = 2 + (residual is not None and activation != "none")
    p = _plan(x, num_groups, reread, chunked=path == "chunked")
    sdz = torch.empty((n, c, p.SPLITS), dtype=torch.float32, device=x.device)
    sdzx = torch.empty_like(sdz)
    common = (
        c, p.S, num_groups, p.CPG, sxn, sxc, sxs, srn, src, srs, p.S_PER_SPLIT, p.SPLITS,
    )  # fmt: skip
    for row0 in range(0, p.rows, p.chunk_rows):
        grid = (min(p.chunk_rows, p.rows - row0), p.SPLITS)
        kb._bwd_reduce_kernel[grid](
            x, dy, w, b, r, mean, rstd, sdz, sdzx, row0, *common, negative_slope,
            GPB=p.GPB, BLOCK_C=p.BLOCK_C, BLOCK_S=p.BLOCK_S, STAGES=_STAGES,
            num_warps=p.warps, **flags,
        )  # fmt: skip
        kb._bwd_dx_kernel[grid](
            x, dy, dx, w, b, r, dres if has_dr else x, dw, db, mean, rstd, sdz, sdzx, row0, n,
            *common, count, negative_slope, HAS_DR=has_dr, GPB=p.GPB, SPLITS_P2=p.SPLITS_P2,
            BLOCK_C=p.BLOCK_C, BLOCK_S=p.BLOCK_S, STAGES=_STAGES, num_warps=p.warps, **flags,
        )  # fmt: skip
    return dx, dw, db, dres
