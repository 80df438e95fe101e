"""Triton kernels of the fused GroupNorm (forward statistics, apply, fused small-group, backward).

Imported only by the launchers in ``group_norm_triton.py`` (this file imports triton at the top).
Every tensor is addressed as an (N, C, S) view with element strides (sn, sc, ss) and int64
offsets, so contiguous and channels-last inputs are read in place and tensors past 2^31 elements
are safe. Loads are cast to float32 before any arithmetic (bf16/fp16 in, fp32 math, input dtype
out), statistics are centred partials merged with Chan's formula (never E[x^2] - E[x]^2), and
no kernel uses atomics, so results are bitwise reproducible. Activation codes: 0 none, 1 relu,
2 leaky_relu, 3 silu, 4 gelu (exact erf form).
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
def _act_grad(z, ACT: tl.constexpr, slope):
    """Derivative of the activation at z (float32); ACT must not be 0."""
    if ACT == 1:
        g = tl.where(z > 0, 1.0, 0.0)
    elif ACT == 2:
        g = tl.where(z > 0, 1.0, slope)
    elif ACT == 3:
        s = 1.0 / (1.0 + tl.exp(-z))
        g = s * (1.0 + z * (1.0 - s))
    else:
        g = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        g += z * tl.exp(-0.5 * z * z) * 0.3989422804014327  # 1/sqrt(2*pi): normal pdf
    return g


@triton.jit
def _merge_partials(MEAN_P, M2_P, row, S, CPG, S_PER_SPLIT, SPLITS, eps, SPLITS_P2: tl.constexpr):
    """Merge a group's (count, mean, M2) partials with Chan's formula; return (mean, rstd)."""
    k = tl.arange(0, SPLITS_P2)
    km = k < SPLITS
    mp = tl.load(MEAN_P + row * SPLITS + k, mask=km, other=0.0)  # (SPLITS_P2,) partial means
    m2p = tl.load(M2_P + row * SPLITS + k, mask=km, other=0.0)  # (SPLITS_P2,) partial M2
    lo = k * S_PER_SPLIT
    cnt = tl.where(km, (tl.minimum(lo + S_PER_SPLIT, S) - lo).to(tl.float32) * CPG, 0.0)
    total = tl.sum(cnt, 0)
    mean = tl.sum(cnt * mp, 0) / total
    d = mp - mean
    m2 = tl.sum(m2p + cnt * d * d, 0)
    rstd = 1.0 / tl.sqrt(m2 / total + eps)
    return mean, rstd


@triton.jit
def _stats_kernel(
    X,  # input, (N, C, S) view with strides (sxn, sxc, sxs)
    MEAN_P,  # out: fp32 (N*G, SPLITS) partial means
    M2_P,  # out: fp32 (N*G, SPLITS) partial centred sums of squares
    S, G, CPG, sxn, sxc, sxs, S_PER_SPLIT, SPLITS,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # n * G + g
    split = tl.program_id(1)
    n = row // G
    g = row % G
    base = n.to(tl.int64) * sxn + (g * CPG).to(tl.int64) * sxc
    s_lo = split * S_PER_SPLIT
    s_hi = tl.minimum(s_lo + S_PER_SPLIT, S)
    cnt = 0.0
    mean = 0.0
    m2 = 0.0
    for c0 in range(0, CPG, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cm = cc < CPG
        for s0 in range(s_lo, s_hi, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            m = cm[:, None] & (ss < s_hi)[None, :]  # (BLOCK_C, BLOCK_S)
            off = base + cc[:, None].to(tl.int64) * sxc + ss[None, :].to(tl.int64) * sxs
            x = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
            t_cnt = tl.sum(tl.sum(m.to(tl.float32), 1), 0)
            t_mean = tl.sum(tl.sum(x, 1), 0) / t_cnt
            d = tl.where(m, x - t_mean, 0.0)
            t_m2 = tl.sum(tl.sum(d * d, 1), 0)
            new_cnt = cnt + t_cnt
            delta = t_mean - mean
            mean += delta * (t_cnt / new_cnt)
            m2 += t_m2 + delta * delta * (cnt * t_cnt / new_cnt)
            cnt = new_cnt
    tl.store(MEAN_P + row * SPLITS + split, mean)
    tl.store(M2_P + row * SPLITS + split, m2)


@triton.jit
def _apply_kernel(
    X, Y,  # input and output, same (N, C, S) strides (sxn, sxc, sxs)
    W, B,  # (C,) gamma and beta (ignored unless HAS_W / HAS_B)
    R,  # residual, strides (srn, src, srs) (ignored unless HAS_R)
    MEAN_P, M2_P,  # fp32 (N*G, SPLITS) partials from _stats_kernel
    MEAN, RSTD,  # out: fp32 (N*G,) statistics saved for backward
    S, G, CPG, sxn, sxc, sxs, srn, src, srs, S_PER_SPLIT, SPLITS, eps, slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr, ACT: tl.constexpr,
    SPLITS_P2: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    split = tl.program_id(1)
    n = row // G
    g = row % G
    mean, rstd = _merge_partials(MEAN_P, M2_P, row, S, CPG, S_PER_SPLIT, SPLITS, eps, SPLITS_P2)
    if split == 0:
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)
    base = n.to(tl.int64) * sxn + (g * CPG).to(tl.int64) * sxc
    rbase = n.to(tl.int64) * srn + (g * CPG).to(tl.int64) * src
    s_lo = split * S_PER_SPLIT
    s_hi = tl.minimum(s_lo + S_PER_SPLIT, S)
    for c0 in range(0, CPG, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cm = cc < CPG
        scale = tl.zeros([BLOCK_C], tl.float32) + rstd
        if HAS_W:
            scale *= tl.load(W + g * CPG + cc, mask=cm, other=1.0).to(tl.float32)
        shift = tl.zeros([BLOCK_C], tl.float32)
        if HAS_B:
            shift += tl.load(B + g * CPG + cc, mask=cm, other=0.0).to(tl.float32)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            m = cm[:, None] & (ss < s_hi)[None, :]
            off = base + cc[:, None].to(tl.int64) * sxc + ss[None, :].to(tl.int64) * sxs
            x = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
            z = (x - mean) * scale[:, None] + shift[:, None]
            if HAS_R:
                roff = rbase + cc[:, None].to(tl.int64) * src + ss[None, :].to(tl.int64) * srs
                z += tl.load(R + roff, mask=m, other=0.0).to(tl.float32)
            tl.store(Y + off, _act(z, ACT, slope).to(Y.dtype.element_ty), mask=m)


@triton.jit
def _fused_kernel(
    X, Y, W, B, R, MEAN, RSTD,  # as in _apply_kernel; one program holds a whole group on chip
    S, G, CPG, sxn, sxc, sxs, srn, src, srs, eps, slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr, ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    n = row // G
    g = row % G
    cc = tl.arange(0, BLOCK_C)
    ss = tl.arange(0, BLOCK_S)
    cm = cc < CPG
    m = cm[:, None] & (ss < S)[None, :]  # (BLOCK_C, BLOCK_S) covers the group
    off = (
        n.to(tl.int64) * sxn
        + (g * CPG + cc[:, None]).to(tl.int64) * sxc
        + ss[None, :].to(tl.int64) * sxs
    )
    x = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
    cnt = (CPG * S).to(tl.float32)
    mean = tl.sum(tl.sum(x, 1), 0) / cnt
    d = tl.where(m, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(d * d, 1), 0) / cnt + eps)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    scale = tl.zeros([BLOCK_C], tl.float32) + rstd
    if HAS_W:
        scale *= tl.load(W + g * CPG + cc, mask=cm, other=1.0).to(tl.float32)
    z = d * scale[:, None]
    if HAS_B:
        z += tl.load(B + g * CPG + cc, mask=cm, other=0.0).to(tl.float32)[:, None]
    if HAS_R:
        roff = (
            n.to(tl.int64) * srn
            + (g * CPG + cc[:, None]).to(tl.int64) * src
            + ss[None, :].to(tl.int64) * srs
        )
        z += tl.load(R + roff, mask=m, other=0.0).to(tl.float32)
    tl.store(Y + off, _act(z, ACT, slope).to(Y.dtype.element_ty), mask=m)


@triton.jit
def _bwd_tile(X, DY, R, off, roff, m, mean, rstd, gamma, beta, slope,
              HAS_R: tl.constexpr, ACT: tl.constexpr):  # fmt: skip
    """Load one tile and return (xhat, dz): dz = dy * act'(recomputed pre-activation)."""
    x = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(DY + off, mask=m, other=0.0).to(tl.float32)
    xhat = (x - mean) * rstd
    if ACT != 0:
        z = xhat * gamma[:, None] + beta[:, None]
        if HAS_R:
            z += tl.load(R + roff, mask=m, other=0.0).to(tl.float32)
        dy = dy * _act_grad(z, ACT, slope)
    return xhat, tl.where(m, dy, 0.0)


@triton.jit
def _bwd_reduce_kernel(
    X, DY,  # input and upstream gradient, same strides (sxn, sxc, sxs)
    W, B, R,  # gamma, beta, residual (for the recomputed pre-activation)
    MEAN, RSTD,  # fp32 (N*G,) saved statistics
    SDZ, SDZX,  # out: fp32 (N, C, SPLITS) sums of dz and dz * xhat
    C, S, G, CPG, sxn, sxc, sxs, srn, src, srs, S_PER_SPLIT, SPLITS, slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr, ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    split = tl.program_id(1)
    n = row // G
    g = row % G
    mean = tl.load(MEAN + row)
    rstd = tl.load(RSTD + row)
    base = n.to(tl.int64) * sxn + (g * CPG).to(tl.int64) * sxc
    rbase = n.to(tl.int64) * srn + (g * CPG).to(tl.int64) * src
    s_lo = split * S_PER_SPLIT
    s_hi = tl.minimum(s_lo + S_PER_SPLIT, S)
    for c0 in range(0, CPG, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cm = cc < CPG
        gamma = tl.full([BLOCK_C], 1.0, tl.float32)
        if HAS_W:
            gamma = tl.load(W + g * CPG + cc, mask=cm, other=1.0).to(tl.float32)
        beta = tl.zeros([BLOCK_C], tl.float32)
        if HAS_B:
            beta = tl.load(B + g * CPG + cc, mask=cm, other=0.0).to(tl.float32)
        acc_dz = tl.zeros([BLOCK_C], tl.float32)
        acc_dzx = tl.zeros([BLOCK_C], tl.float32)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            m = cm[:, None] & (ss < s_hi)[None, :]
            off = base + cc[:, None].to(tl.int64) * sxc + ss[None, :].to(tl.int64) * sxs
            roff = rbase + cc[:, None].to(tl.int64) * src + ss[None, :].to(tl.int64) * srs
            xhat, dz = _bwd_tile(X, DY, R, off, roff, m, mean, rstd, gamma, beta, slope, HAS_R, ACT)
            acc_dz += tl.sum(dz, 1)
            acc_dzx += tl.sum(dz * xhat, 1)
        p = (n * C + g * CPG + cc).to(tl.int64) * SPLITS + split
        tl.store(SDZ + p, acc_dz, mask=cm)
        tl.store(SDZX + p, acc_dzx, mask=cm)


@triton.jit
def _bwd_dx_kernel(
    X, DY, DX,  # input, upstream gradient, out: dx; same strides (sxn, sxc, sxs)
    W, B, R, DR,  # gamma, beta, residual (strides srn, src, srs), out: d(residual) (same strides)
    MEAN, RSTD, SDZ, SDZX,  # saved statistics and the (N, C, SPLITS) sums of _bwd_reduce_kernel
    C, S, G, CPG, sxn, sxc, sxs, srn, src, srs, S_PER_SPLIT, SPLITS, slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr, HAS_DR: tl.constexpr,
    ACT: tl.constexpr, SPLITS_P2: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    split = tl.program_id(1)
    n = row // G
    g = row % G
    mean = tl.load(MEAN + row)
    rstd = tl.load(RSTD + row)
    # c1 = mean over the group of dL/dxhat, c2 = mean of dL/dxhat * xhat (dL/dxhat = gamma * dz).
    k = tl.arange(0, SPLITS_P2)
    c1 = 0.0
    c2 = 0.0
    for c0 in range(0, CPG, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cm = cc < CPG
        p = (n * C + g * CPG + cc[:, None]).to(tl.int64) * SPLITS + k[None, :]
        pm = cm[:, None] & (k < SPLITS)[None, :]
        sdz = tl.sum(tl.load(SDZ + p, mask=pm, other=0.0), 1)  # (BLOCK_C,)
        sdzx = tl.sum(tl.load(SDZX + p, mask=pm, other=0.0), 1)
        if HAS_W:
            gamma = tl.load(W + g * CPG + cc, mask=cm, other=0.0).to(tl.float32)
            sdz *= gamma
            sdzx *= gamma
        c1 += tl.sum(sdz, 0)
        c2 += tl.sum(sdzx, 0)
    cnt = (CPG * S).to(tl.float32)
    c1 = c1 / cnt
    c2 = c2 / cnt
    base = n.to(tl.int64) * sxn + (g * CPG).to(tl.int64) * sxc
    rbase = n.to(tl.int64) * srn + (g * CPG).to(tl.int64) * src
    s_lo = split * S_PER_SPLIT
    s_hi = tl.minimum(s_lo + S_PER_SPLIT, S)
    for c0 in range(0, CPG, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cm = cc < CPG
        gamma = tl.full([BLOCK_C], 1.0, tl.float32)
        if HAS_W:
            gamma = tl.load(W + g * CPG + cc, mask=cm, other=1.0).to(tl.float32)
        beta = tl.zeros([BLOCK_C], tl.float32)
        if HAS_B:
            beta = tl.load(B + g * CPG + cc, mask=cm, other=0.0).to(tl.float32)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            m = cm[:, None] & (ss < s_hi)[None, :]
            off = base + cc[:, None].to(tl.int64) * sxc + ss[None, :].to(tl.int64) * sxs
            roff = rbase + cc[:, None].to(tl.int64) * src + ss[None, :].to(tl.int64) * srs
            xhat, dz = _bwd_tile(X, DY, R, off, roff, m, mean, rstd, gamma, beta, slope, HAS_R, ACT)
            dx = rstd * (gamma[:, None] * dz - c1 - xhat * c2)
            tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=m)
            if HAS_DR:
                tl.store(DR + roff, dz.to(DR.dtype.element_ty), mask=m)
