"""Triton kernels of the fused GroupNorm backward: split reduce + dx, and the one-pass fused kernel.

Same addressing, tiles and group blocks as ``group_norm_kernels.py`` (read its docstring).
dz = dy * act'(recomputed pre-activation) (no saved pre-activation tensor); with
c1 = mean(gamma * dz) and c2 = mean(gamma * dz * xhat) over a group,
dx = rstd * (gamma * dz - c1 - xhat * c2). dW = sum(dz * xhat) and dB = sum(dz) over samples and
voxels are folded into the kernels: the split path sums its (N, C, SPLITS) partials in the dx
kernel's programs of the last sample (fixed order, so deterministic; by then every sample's
reduce launch has run), and the fused path, one program per group block looping over the
samples, accumulates them in registers. No atomics anywhere.
"""

from __future__ import annotations

import triton
import triton.language as tl

from medgn.ops.group_norm_kernels import _affine, _block_start, _offsets


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
def _bwd_tile(X, DY, R, off, roff, m, mean, rstd, gamma, beta, slope,
              HAS_R: tl.constexpr, ACT: tl.constexpr):  # fmt: skip
    """Load one (GPB, BLOCK_C, BLOCK_S) tile; return (xhat, dz). mean/rstd (GPB,), gamma/beta
    (GPB, BLOCK_C)."""
    x = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(DY + off, mask=m, other=0.0).to(tl.float32)
    xhat = (x - mean[:, None, None]) * rstd[:, None, None]
    if ACT != 0:
        z = xhat * gamma[:, :, None] + beta[:, :, None]
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
    ROW0, C, S, G, CPG, sxn, sxc, sxs, srn, src, srs, S_PER_SPLIT, SPLITS, slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr, ACT: tl.constexpr,
    GPB: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    rb = ROW0 + tl.program_id(0)
    split = tl.program_id(1)
    n, g0, base = _block_start(rb, G, CPG, sxn, sxc, GPB)
    _n, _g0, rbase = _block_start(rb, G, CPG, srn, src, GPB)
    gg = tl.arange(0, GPB)
    mean = tl.load(MEAN + n * G + g0 + gg)
    rstd = tl.load(RSTD + n * G + g0 + gg)
    s_lo = split * S_PER_SPLIT
    s_hi = tl.minimum(s_lo + S_PER_SPLIT, S)
    for c0 in range(0, CPG, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cm = cc < CPG
        gamma, beta = _affine(W, B, g0, gg, cc, cm, CPG, HAS_W, HAS_B)
        acc_dz = tl.zeros([GPB, BLOCK_C, BLOCK_S], tl.float32)  # per-lane accumulators
        acc_dzx = tl.zeros([GPB, BLOCK_C, BLOCK_S], tl.float32)
        for s0 in tl.range(s_lo, s_hi, BLOCK_S, num_stages=STAGES):
            ss = s0 + tl.arange(0, BLOCK_S)
            m = cm[None, :, None] & (ss < s_hi)[None, None, :]
            off = _offsets(base, gg, cc, ss, CPG, sxc, sxs)
            roff = _offsets(rbase, gg, cc, ss, CPG, src, srs)
            xhat, dz = _bwd_tile(X, DY, R, off, roff, m, mean, rstd, gamma, beta, slope, HAS_R, ACT)
            acc_dz += dz
            acc_dzx += dz * xhat
        ch = (g0 + gg[:, None]) * CPG + cc[None, :]  # (GPB, BLOCK_C)
        p = (n * C + ch).to(tl.int64) * SPLITS + split
        pm = cm[None, :] & (gg[:, None] >= 0)
        tl.store(SDZ + p, tl.sum(acc_dz, 2), mask=pm)
        tl.store(SDZX + p, tl.sum(acc_dzx, 2), mask=pm)


@triton.jit
def _bwd_dx_kernel(
    X, DY, DX,  # input, upstream gradient, out: dx; same strides (sxn, sxc, sxs)
    W, B, R, DR,  # gamma, beta, residual (strides srn, src, srs), out: d(residual) (same strides)
    DW, DB,  # out: (C,) dweight, dbias (written unless HAS_W / HAS_B is off)
    MEAN, RSTD, SDZ, SDZX,  # saved statistics and the (N, C, SPLITS) sums of _bwd_reduce_kernel
    ROW0, N, C, S, G, CPG, sxn, sxc, sxs, srn, src, srs, S_PER_SPLIT, SPLITS, group_count, slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr, HAS_DR: tl.constexpr,
    ACT: tl.constexpr, GPB: tl.constexpr, SPLITS_P2: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    rb = ROW0 + tl.program_id(0)
    split = tl.program_id(1)
    n, g0, base = _block_start(rb, G, CPG, sxn, sxc, GPB)
    _n, _g0, rbase = _block_start(rb, G, CPG, srn, src, GPB)
    gg = tl.arange(0, GPB)
    mean = tl.load(MEAN + n * G + g0 + gg)
    rstd = tl.load(RSTD + n * G + g0 + gg)
    k = tl.arange(0, SPLITS_P2)
    km = k < SPLITS
    # c1 = mean over the group of dL/dxhat, c2 = mean of dL/dxhat * xhat (dL/dxhat = gamma * dz).
    c1 = tl.zeros([GPB], tl.float32)
    c2 = tl.zeros([GPB], tl.float32)
    for c0 in range(0, CPG, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cm = cc < CPG
        gamma, _beta = _affine(W, B, g0, gg, cc, cm, CPG, HAS_W, False)
        ch = (g0 + gg[:, None]) * CPG + cc[None, :]  # (GPB, BLOCK_C)
        p = (n * C + ch).to(tl.int64)[:, :, None] * SPLITS + k[None, None, :]
        pm = cm[None, :, None] & km[None, None, :] & (gg >= 0)[:, None, None]
        c1 += tl.sum(tl.sum(tl.load(SDZ + p, mask=pm, other=0.0), 2) * gamma, 1)
        c2 += tl.sum(tl.sum(tl.load(SDZX + p, mask=pm, other=0.0), 2) * gamma, 1)
        if (split == 0) & (n == N - 1):  # dW/dB: fixed-order sums over samples and splits
            dw = tl.zeros([GPB, BLOCK_C], tl.float32)
            db = tl.zeros([GPB, BLOCK_C], tl.float32)
            for nn in range(0, N):
                q = (nn * C + ch).to(tl.int64)[:, :, None] * SPLITS + k[None, None, :]
                dw += tl.sum(tl.load(SDZX + q, mask=pm, other=0.0), 2)
                db += tl.sum(tl.load(SDZ + q, mask=pm, other=0.0), 2)
            wm = cm[None, :] & (gg[:, None] >= 0)
            if HAS_W:
                tl.store(DW + ch, dw.to(DW.dtype.element_ty), mask=wm)
            if HAS_B:
                tl.store(DB + ch, db.to(DB.dtype.element_ty), mask=wm)
    c1 = c1 / group_count
    c2 = c2 / group_count
    s_lo = split * S_PER_SPLIT
    s_hi = tl.minimum(s_lo + S_PER_SPLIT, S)
    for c0 in range(0, CPG, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cm = cc < CPG
        gamma, beta = _affine(W, B, g0, gg, cc, cm, CPG, HAS_W, HAS_B)
        for s0 in tl.range(s_lo, s_hi, BLOCK_S, num_stages=STAGES):
            ss = s0 + tl.arange(0, BLOCK_S)
            m = cm[None, :, None] & (ss < s_hi)[None, None, :]
            off = _offsets(base, gg, cc, ss, CPG, sxc, sxs)
            roff = _offsets(rbase, gg, cc, ss, CPG, src, srs)
            xhat, dz = _bwd_tile(X, DY, R, off, roff, m, mean, rstd, gamma, beta, slope, HAS_R, ACT)
            dx = rstd[:, None, None] * (gamma[:, :, None] * dz - c1[:, None, None] - xhat * c2[:, None, None])
            tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=m)
            if HAS_DR:
                tl.store(DR + roff, dz.to(DR.dtype.element_ty), mask=m)


@triton.jit
def _bwd_fused_kernel(
    X, DY, DX, W, B, R, DR, DW, DB, MEAN, RSTD,  # as in _bwd_dx_kernel; groups held on chip
    N, S, G, CPG, sxn, sxc, sxs, srn, src, srs, group_count, slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr, HAS_DR: tl.constexpr,
    ACT: tl.constexpr, GPB: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    gb = tl.program_id(0)  # group block; this program loops over the N samples
    gg = tl.arange(0, GPB)
    cc = tl.arange(0, BLOCK_C)
    ss = tl.arange(0, BLOCK_S)
    cm = cc < CPG
    m = cm[None, :, None] & (ss < S)[None, None, :]
    _n0, g0, _b0 = _block_start(gb, G, CPG, sxn, sxc, GPB)
    gamma, beta = _affine(W, B, g0, gg, cc, cm, CPG, HAS_W, HAS_B)
    dw = tl.zeros([GPB, BLOCK_C], tl.float32)
    db = tl.zeros([GPB, BLOCK_C], tl.float32)
    for n in range(0, N):
        _n, _g0, base = _block_start(n * (G // GPB) + gb, G, CPG, sxn, sxc, GPB)
        _n, _g0, rbase = _block_start(n * (G // GPB) + gb, G, CPG, srn, src, GPB)
        mean = tl.load(MEAN + n * G + g0 + gg)
        rstd = tl.load(RSTD + n * G + g0 + gg)
        off = _offsets(base, gg, cc, ss, CPG, sxc, sxs)
        roff = _offsets(rbase, gg, cc, ss, CPG, src, srs)
        xhat, dz = _bwd_tile(X, DY, R, off, roff, m, mean, rstd, gamma, beta, slope, HAS_R, ACT)
        sdz = tl.sum(dz, 2)  # (GPB, BLOCK_C)
        sdzx = tl.sum(dz * xhat, 2)
        dw += sdzx
        db += sdz
        c1 = tl.sum(sdz * gamma, 1) / group_count  # (GPB,)
        c2 = tl.sum(sdzx * gamma, 1) / group_count
        dx = rstd[:, None, None] * (gamma[:, :, None] * dz - c1[:, None, None] - xhat * c2[:, None, None])
        tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=m)
        if HAS_DR:
            tl.store(DR + roff, dz.to(DR.dtype.element_ty), mask=m)
    ch = (g0 + gg[:, None]) * CPG + cc[None, :]
    wm = cm[None, :] & (gg[:, None] >= 0)
    if HAS_W:
        tl.store(DW + ch, dw.to(DW.dtype.element_ty), mask=wm)
    if HAS_B:
        tl.store(DB + ch, db.to(DB.dtype.element_ty), mask=wm)
