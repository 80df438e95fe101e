"""Launchers of the GroupNorm Triton kernels: layouts, split counts, buffers and grids.

The kernels live in ``group_norm_kernels.py`` and are imported inside the launchers, so importing
this file (and medgn.ops) never imports triton. A tensor reaches the kernels as an (N, C, S) view
with strides (sn, sc, ss): contiguous gives (C*S, S, 1) and channels_last(_3d) gives (S*C, 1, C), so
both layouts are read in place; any other layout is copied to contiguous first.
"""

from __future__ import annotations

import math

import torch

__all__ = ["alloc_like", "group_norm_backward", "group_norm_forward", "kernel_strides"]


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


_ACT_CODES = {"none": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu": 4}
# Elements per tile of the split kernels: 2048 fp32 values are 16 per thread at 4 warps, enough
# loads in flight to saturate HBM without spilling. The interpreter runs tiles as numpy arrays,
# where a smaller tile lets the tiny test shapes exercise several splits.
_TILE_GPU = 2048
_TILE_CPU = 512
# Largest group the fused one-program kernel keeps on chip (1 read + 1 write): 8192 fp32 values
# are 32 registers per thread at 8 warps.
_FUSED_MAX = 8192
# Split-program target: 4 waves of programs per SM hides the tail of the last wave; the CPU
# interpreter has no SMs, 16 keeps test grids small while giving several splits.
_WAVES = 4
_CPU_PROGRAMS = 16
# Upper bound on splits per group: the apply and dx kernels load all partials of a group at once.
_MAX_SPLITS = 512


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _plan(x: torch.Tensor, num_groups: int) -> dict[str, int]:
    """Tile sizes and split count for x seen as (N, G, C//G, S)."""
    n, c = x.shape[:2]
    s = math.prod(x.shape[2:])
    cpg = c // num_groups
    if x.is_cuda:
        tile = _TILE_GPU
        programs = _WAVES * torch.cuda.get_device_properties(x.device).multi_processor_count
    else:
        tile, programs = _TILE_CPU, _CPU_PROGRAMS
    block_c = min(_next_pow2(cpg), tile)
    block_s = max(1, min(_next_pow2(s), tile // block_c))
    want = max(1, min(_MAX_SPLITS, -(-programs // (n * num_groups))))
    s_per_split = -(-s // want)
    s_per_split = -(-s_per_split // block_s) * block_s  # whole tiles per split
    splits = -(-s // s_per_split)
    return {
        "S": s,
        "CPG": cpg,
        "BLOCK_C": block_c,
        "BLOCK_S": block_s,
        "S_PER_SPLIT": s_per_split,
        "SPLITS": splits,
        "SPLITS_P2": _next_pow2(splits),
    }


def _warps(block: int) -> int:
    """Warps for a tile of ``block`` elements: about 8 elements per thread, 4 to 16 warps."""
    return max(4, min(16, block // 256))


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

    Arguments are those of ``medgn.ops.group_norm`` (already checked). ``path`` picks "fused"
    (one program per group, the group on chip), "split" (statistics partials then apply) or
    "auto" (fused when the group fits in ``_FUSED_MAX`` elements).
    """
    from medgn.ops import group_norm_kernels as k

    n = x.shape[0]
    y = alloc_like(x)
    x, sxn, sxc, sxs = kernel_strides(x)
    r, srn, src, srs = kernel_strides(residual) if residual is not None else (x, 0, 0, 0)
    mean = torch.empty((n, num_groups), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    p = _plan(x, num_groups)
    flags = {
        "HAS_W": weight is not None,
        "HAS_B": bias is not None,
        "HAS_R": residual is not None,
        "ACT": _ACT_CODES[activation],
    }
    w = weight if weight is not None else x
    b = bias if bias is not None else x
    fused_c, fused_s = _next_pow2(p["CPG"]), _next_pow2(p["S"])
    if path == "fused" or (path == "auto" and fused_c * fused_s <= _FUSED_MAX):
        k._fused_kernel[(n * num_groups,)](
            x, y, w, b, r, mean, rstd,
            p["S"], num_groups, p["CPG"], sxn, sxc, sxs, srn, src, srs, eps, negative_slope,
            BLOCK_C=fused_c, BLOCK_S=fused_s, num_warps=_warps(fused_c * fused_s), **flags,
        )  # fmt: skip
        return y, mean, rstd
    grid = (n * num_groups, p["SPLITS"])
    mean_p = torch.empty((n * num_groups, p["SPLITS"]), dtype=torch.float32, device=x.device)
    m2_p = torch.empty_like(mean_p)
    warps = _warps(p["BLOCK_C"] * p["BLOCK_S"])
    k._stats_kernel[grid](
        x, mean_p, m2_p, p["S"], num_groups, p["CPG"], sxn, sxc, sxs, p["S_PER_SPLIT"],
        p["SPLITS"], BLOCK_C=p["BLOCK_C"], BLOCK_S=p["BLOCK_S"], num_warps=warps,
    )  # fmt: skip
    k._apply_kernel[grid](
        x, y, w, b, r, mean_p, m2_p, mean, rstd,
        p["S"], num_groups, p["CPG"], sxn, sxc, sxs, srn, src, srs, p["S_PER_SPLIT"],
        p["SPLITS"], eps, negative_slope, SPLITS_P2=p["SPLITS_P2"], BLOCK_C=p["BLOCK_C"],
        BLOCK_S=p["BLOCK_S"], num_warps=warps, **flags,
    )  # fmt: skip
    return y, mean, rstd


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the backward kernels; return (dx, dweight, dbias, dresidual).

    dweight/dbias are empty (0,) tensors when weight/bias is None, and dresidual is empty unless
    ``need_dres`` and a residual was given. dweight/dbias are two-stage sums: per (n, c, split)
    in the reduce kernel, then a fixed-order sum over n and splits, so they are deterministic.
    """
    from medgn.ops import group_norm_kernels as k

    n, c = x.shape[:2]
    dx = alloc_like(x)
    x, sxn, sxc, sxs = kernel_strides(x)
    # The kernels read dy with x's strides: give dy x's memory format (a no-op when it has it).
    fmt = _channels_last_format(x) if _is_channels_last(x) else torch.contiguous_format
    dy = dy.contiguous(memory_format=fmt)
    has_dr = need_dres and residual is not None
    dres = alloc_like(residual) if has_dr else x.new_empty((0,))
    r, srn, src, srs = kernel_strides(residual) if residual is not None else (x, 0, 0, 0)
    p = _plan(x, num_groups)
    grid = (n * num_groups, p["SPLITS"])
    sdz = torch.empty((n, c, p["SPLITS"]), dtype=torch.float32, device=x.device)
    sdzx = torch.empty_like(sdz)
    flags = {
        "HAS_W": weight is not None,
        "HAS_B": bias is not None,
        "HAS_R": residual is not None,
        "ACT": _ACT_CODES[activation],
    }
    w = weight if weight is not None else x
    b = bias if bias is not None else x
    warps = _warps(p["BLOCK_C"] * p["BLOCK_S"])
    common = (
        c, p["S"], num_groups, p["CPG"], sxn, sxc, sxs, srn, src, srs, p["S_PER_SPLIT"],
        p["SPLITS"], negative_slope,
    )  # fmt: skip
    k._bwd_reduce_kernel[grid](
        x, dy, w, b, r, mean, rstd, sdz, sdzx, *common,
        BLOCK_C=p["BLOCK_C"], BLOCK_S=p["BLOCK_S"], num_warps=warps, **flags,
    )  # fmt: skip
    k._bwd_dx_kernel[grid](
        x, dy, dx, w, b, r, dres if has_dr else x, mean, rstd, sdz, sdzx, *common,
        HAS_DR=has_dr, SPLITS_P2=p["SPLITS_P2"], BLOCK_C=p["BLOCK_C"], BLOCK_S=p["BLOCK_S"],
        num_warps=warps, **flags,
    )  # fmt: skip
    # Absent gradients are distinct empty tensors: custom-op outputs may not alias each other.
    dw = sdzx.sum(dim=(0, 2)).to(weight.dtype) if weight is not None else x.new_empty((0,))
    db = sdz.sum(dim=(0, 2)).to(bias.dtype) if bias is not None else x.new_empty((0,))
    return dx, dw, db, dres
