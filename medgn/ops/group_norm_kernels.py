"""Triton kernels of the fused GroupNorm forward: statistics partials, apply, one-pass fused.

Imported only by the launchers in ``group_norm_triton.py`` (this file imports triton at the top);
the backward kernels are in ``group_norm_kernels_bwd.py``. Every tensor is addressed as an
(N, C, S) view with element strides (sn, sc, ss) and int64 offsets, so contiguous and channels-last
inputs are read in place and tensors past 2^31 elements are safe.

Tiles are 3D, (GPB, BLOCK_C, BLOCK_S): GPB whole groups of BLOCK_C >= CPG channels (or a
BLOCK_C chunk of one large group) by BLOCK_S voxels. A program owns a "group block" of GPB
consecutive groups of one sample: on channels_last inputs several groups make the contiguous
channel run of a voxel, so a tile spans voxels x many channels and per-group sums come from a
reduction over the tile's channel and voxel axes; contiguous inputs use GPB = 1.

Streaming loops keep per-lane accumulators (one value per tile element) and reduce once after
the loop, and iterate with ``tl.range(..., num_stages=STAGES)`` so the compiler pipelines loads.
Statistics are shifted sums per lane (the shift is the lane's value in the first tile, so the
sums stay centred to within a few standard deviations: no E[x^2] - E[x]^2 cancellation), turned
into centred (count, mean, M2) per lane and merged with Chan's formula. Loads are cast to float32
before any arithmetic (bf16/fp16 in, fp32 math, input dtype out); no kernel uses atomics, so
results are bitwise reproducible. Activation codes: 0 none, 1 relu, 2 leaky_relu, 3 silu, 4 gelu
(exact erf form).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _act(z, ACT: tl.constexpr, slope):
    """Activation of the pre-activation z (float32)."""
    if ACT == 1:
        z = tl.where(z > 0, z, 0.0)
    elif ACT == 2:
        z = tl.where(z > 0, z, z * slope)
    elif ACT == 3:
        z = z / (1.0 + tl.exp(-z))
    elif ACT == 4:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))  # 1/sqrt(2): exact GELU
    return z


@triton.jit
def _block_start(rb, G, CPG, sxn, sxc, GPB: tl.constexpr):
    """(n, g0, base offset) of group block ``rb`` = n * (G // GPB) + g0 // GPB."""
    nb = G // GPB
    n = rb // nb
    g0 = (rb % nb) * GPB
    base = n.to(tl.int64) * sxn + (g0 * CPG).to(tl.int64) * sxc
    return n, g0, base


@triton.jit
def _offsets(base, gg, cc, ss, CPG, sxc, sxs):
    """int64 offsets of a (GPB, BLOCK_C, BLOCK_S) tile: groups gg, channels cc, voxels ss."""
    ch = gg[:, None, None] * CPG + cc[None, :, None]
    return base + ch.to(tl.int64) * sxc + ss[None, None, :].to(tl.int64) * sxs


@triton.jit
def _affine(W, B, g0, gg, cc, cm, CPG, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """(gamma, beta) of the tile's channels as (GPB, BLOCK_C) float32 (1 and 0 when absent)."""
    ch = (g0 + gg[:, None]) * CPG + cc[None, :]
    m = cm[None, :] & (gg[:, None] >= 0)
    gamma = tl.full(ch.shape, 1.0, tl.float32)
    beta = tl.zeros(ch.shape, tl.float32)
    if HAS_W:
        gamma = tl.load(W + ch, mask=m, other=1.0).to(tl.float32)
    if HAS_B:
        beta = tl.load(B + ch, mask=m, other=0.0).to(tl.float32)
    return gamma, beta


@triton.jit
def _merge_partials(MEAN_P, M2_P, rows, S, CPG, S_PER_SPLIT, SPLITS, eps, SPLITS_P2: tl.constexpr):
    """Merge the (count, mean, M2) partials of groups ``rows`` (GPB,) with Chan's formula."""
    k = tl.arange(0, SPLITS_P2)
    km = k < SPLITS
    p = rows[:, None] * SPLITS + k[None, :]  # (GPB, SPLITS_P2)
    pm = km[None, :] & (rows[:, None] >= 0)
    mp = tl.load(MEAN_P + p, mask=pm, other=0.0)
    m2p = tl.load(M2_P + p, mask=pm, other=0.0)
    lo = k * S_PER_SPLIT
    cnt = tl.where(km, (tl.minimum(lo + S_PER_SPLIT, S) - lo).to(tl.float32) * CPG, 0.0)
    total = tl.sum(cnt, 0)
    mean = tl.sum(cnt[None, :] * mp, 1) / total  # (GPB,)
    d = mp - mean[:, None]
    m2 = tl.sum(m2p + cnt[None, :] * d * d, 1)
    rstd = 1.0 / tl.sqrt(m2 / total + eps)
    return mean, rstd


@triton.jit
def _stats_kernel(
    X,  # input, (N, C, S) view with strides (sxn, sxc, sxs)
    MEAN_P,  # out: fp32 (N*G, SPLITS) partial means
    M2_P,  # out: fp32 (N*G, SPLITS) partial centred sums of squares
    ROW0,  # first group block of this launch (launches cover L2-sized chunks of blocks)
    S, G, CPG, sxn, sxc, sxs, S_PER_SPLIT, SPLITS,
    GPB: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    rb = ROW0 + tl.program_id(0)
    split = tl.program_id(1)
    n, g0, base = _block_start(rb, G, CPG, sxn, sxc, GPB)
    gg = tl.arange(0, GPB)
    s_lo = split * S_PER_SPLIT
    s_hi = tl.minimum(s_lo + S_PER_SPLIT, S)
    # Per-lane shift: the lane's value in the split's first tile (0 where that tile is masked).
    c0s = tl.arange(0, BLOCK_C)
    ss0 = s_lo + tl.arange(0, BLOCK_S)
    m0 = (c0s < CPG)[None, :, None] & (ss0 < s_hi)[None, None, :]
    shift = tl.load(X + _offsets(base, gg, c0s, ss0, CPG, sxc, sxs), mask=m0, other=0.0)
    shift = shift.to(tl.float32)
    s1 = tl.zeros([GPB, BLOCK_C, BLOCK_S], tl.float32)  # per-lane sum of (x - shift)
    s2 = tl.zeros([GPB, BLOCK_C, BLOCK_S], tl.float32)  # per-lane sum of (x - shift)^2
    cnt = tl.zeros([GPB, BLOCK_C, BLOCK_S], tl.float32)  # per-lane element count
    for c0 in range(0, CPG, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cm = cc < CPG
        for s0 in tl.range(s_lo, s_hi, BLOCK_S, num_stages=STAGES):
            ss = s0 + tl.arange(0, BLOCK_S)
            m = cm[None, :, None] & (ss < s_hi)[None, None, :]
            x = tl.load(X + _offsets(base, gg, cc, ss, CPG, sxc, sxs), mask=m, other=0.0)
            d = tl.where(m, x.to(tl.float32) - shift, 0.0)
            s1 += d
            s2 += d * d
            cnt += m.to(tl.float32)
    # One reduction after the loop: lane (count, mean, M2) -> group, with Chan's formula.
    lane_mean = shift + s1 / tl.maximum(cnt, 1.0)
    lane_m2 = s2 - s1 * (s1 / tl.maximum(cnt, 1.0))
    total = tl.sum(tl.sum(cnt, 2), 1)  # (GPB,)
    mean = tl.sum(tl.sum(cnt * lane_mean, 2), 1) / total
    dm = lane_mean - mean[:, None, None]
    m2 = tl.sum(tl.sum(lane_m2 + cnt * dm * dm, 2), 1)
    p = (n * G + g0 + gg) * SPLITS + split
    tl.store(MEAN_P + p, mean)
    tl.store(M2_P + p, m2)


@triton.jit
def _apply_kernel(
    X, Y,  # input and output, same (N, C, S) strides (sxn, sxc, sxs)
    W, B,  # (C,) gamma and beta (ignored unless HAS_W / HAS_B)
    R,  # residual, strides (srn, src, srs) (ignored unless HAS_R)
    MEAN_P, M2_P,  # fp32 (N*G, SPLITS) partials from _stats_kernel
    MEAN, RSTD,  # out: fp32 (N*G,) statistics saved for backward
    ROW0, S, G, CPG, sxn, sxc, sxs, srn, src, srs, S_PER_SPLIT, SPLITS, eps, slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr, ACT: tl.constexpr,
    GPB: tl.constexpr, SPLITS_P2: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    rb = ROW0 + tl.program_id(0)
    split = tl.program_id(1)
    n, g0, base = _block_start(rb, G, CPG, sxn, sxc, GPB)
    _n, _g0, rbase = _block_start(rb, G, CPG, srn, src, GPB)
    gg = tl.arange(0, GPB)
    rows = n * G + g0 + gg
    mean, rstd = _merge_partials(MEAN_P, M2_P, rows, S, CPG, S_PER_SPLIT, SPLITS, eps, SPLITS_P2)
    if split == 0:
        tl.store(MEAN + rows, mean)
        tl.store(RSTD + rows, rstd)
    s_lo = split * S_PER_SPLIT
    s_hi = tl.minimum(s_lo + S_PER_SPLIT, S)
    for c0 in range(0, CPG, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cm = cc < CPG
        gamma, beta = _affine(W, B, g0, gg, cc, cm, CPG, HAS_W, HAS_B)
        scale = (gamma * rstd[:, None])[:, :, None]  # (GPB, BLOCK_C, 1)
        # Centred, (x - mean) * scale + beta, not x * scale + (beta - mean * scale): the GPU
        # contracts the latter into one FMA whose rounding of x * scale does not cancel, so a
        # constant group (or |mean| >> std) got an error of ulp(mean * scale) instead of 0.
        for s0 in tl.range(s_lo, s_hi, BLOCK_S, num_stages=STAGES):
            ss = s0 + tl.arange(0, BLOCK_S)
            m = cm[None, :, None] & (ss < s_hi)[None, None, :]
            off = _offsets(base, gg, cc, ss, CPG, sxc, sxs)
            xc = tl.load(X + off, mask=m, other=0.0).to(tl.float32) - mean[:, None, None]
            z = xc * scale + beta[:, :, None]
            if HAS_R:
                roff = _offsets(rbase, gg, cc, ss, CPG, src, srs)
                z += tl.load(R + roff, mask=m, other=0.0).to(tl.float32)
            tl.store(Y + off, _act(z, ACT, slope).to(Y.dtype.element_ty), mask=m)


@triton.jit
def _fused_kernel(
    X, Y, W, B, R, MEAN, RSTD,  # as in _apply_kernel; one program holds GPB whole groups on chip
    S, G, CPG, sxn, sxc, sxs, srn, src, srs, group_count, eps, slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr, ACT: tl.constexpr,
    GPB: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    # group_count = CPG * S as a host float: no int32 product, and no constexpr-int .to() when
    # Triton specialises CPG = S = 1.
    rb = tl.program_id(0)
    n, g0, base = _block_start(rb, G, CPG, sxn, sxc, GPB)
    _n, _g0, rbase = _block_start(rb, G, CPG, srn, src, GPB)
    gg = tl.arange(0, GPB)
    cc = tl.arange(0, BLOCK_C)
    ss = tl.arange(0, BLOCK_S)
    cm = cc < CPG
    m = cm[None, :, None] & (ss < S)[None, None, :]  # (GPB, BLOCK_C, BLOCK_S) covers the groups
    off = _offsets(base, gg, cc, ss, CPG, sxc, sxs)
    x = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(tl.sum(x, 2), 1) / group_count  # (GPB,)
    d = tl.where(m, x - mean[:, None, None], 0.0)  # exact two-pass centring, in registers
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(d * d, 2), 1) / group_count + eps)
    rows = n * G + g0 + gg
    tl.store(MEAN + rows, mean)
    tl.store(RSTD + rows, rstd)
    gamma, beta = _affine(W, B, g0, gg, cc, cm, CPG, HAS_W, HAS_B)
    z = d * (gamma * rstd[:, None])[:, :, None] + beta[:, :, None]
    if HAS_R:
        z += tl.load(R + _offsets(rbase, gg, cc, ss, CPG, src, srs), mask=m, other=0.0).to(tl.float32)
    tl.store(Y + off, _act(z, ACT, slope).to(Y.dtype.element_ty), mask=m)
