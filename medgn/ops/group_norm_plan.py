"""Launch planning of the GroupNorm Triton kernels: paths, tile sizes, split counts, L2 chunks.

Pure Python on tensor metadata (no triton import). Paths and the bytes each moves, in tensor
volumes (one volume = x.numel() * x.element_size(); "+R" = one more volume when a residual is
given; :func:`moved_volumes` returns these numbers, :func:`planned_volumes` those of a call):

=========  =====================================================  ==========  ====================
path       kernels                                                forward     backward
=========  =====================================================  ==========  ====================
fused      one program holds whole groups on chip (forward: one   2 (+R)      3 (+R if act, +R if
           per sample and group block; backward: one per group                 d(residual))
           block, looping over the samples, dW/dB in registers)
split      statistics partials (read x), then apply (read x,      3 (+R)      5 (+2R if act, +R if
           write y); backward: reduce (read x, dy), dx (read x,                d(residual))
           dy, write dx; dW/dB folded into its last-sample
           programs)
chunked    split, launched per chunk of group blocks sized to a   2 (+R) HBM  3 (+R if act, +R if
           third of L2, so the second pass re-reads the chunk    if the L2   d(residual)) HBM if
           the first pass just read from L2, not HBM. A block    re-read     the L2 re-read hits;
           larger than that budget (a channels_last sample,      hits; else  else the split's
           whose groups interleave) gets the split's traffic     3 (+R)
=========  =====================================================  ==========  ====================

The minimal traffic is 2 volumes forward (read x, write y) and 3 backward (read x and dy, write
dx). "auto" takes fused when the group block fits on chip (``_FUSED_MAX`` elements forward,
``_FUSED_BWD_MAX`` backward), else split. Chunked is only taken when asked for: on an H200 (torch
2.11, Triton 3.6) every launch cost about 35 us of host time, and a chunk of a third of L2 (20 MB)
saves only about 5 us of HBM traffic, so the chunked loop was launch-bound: 2x32x128^3 bf16
forward took 1.17 ms in 26 launches, backward 2.64 ms in 64 (``benchmarks/results/
group_norm_h200.md``). Split makes the same call in 2 launches each way, and when the tensor fits
in one chunk it is the chunked path anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["PATHS", "backward_path", "forward_path", "fused_launch_block", "moved_volumes", "planned_volumes"]


def _channels_last_format(t: torch.Tensor) -> torch.memory_format | None:
    """The channels-last memory format for t's rank, or None for ranks without one."""
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())


def _is_channels_last(t: torch.Tensor) -> bool:
    """True when t is dense channels-last (and not also plain contiguous)."""
    fmt = _channels_last_format(t)
    return fmt is not None and not t.is_contiguous() and t.is_contiguous(memory_format=fmt)


# Elements per tile of the streaming kernels in the interpreter, which runs tiles as numpy arrays:
# a small tile lets the tiny test shapes exercise several splits.
_TILE_CPU = 512
# GPU tiles: (elements per tile, warps or None for ``_warps``) per (pass, channels_last), for 16-bit
# and for float32 inputs, from ``benchmarks/tune_group_norm.py`` on an H200 (torch 2.11, Triton
# 3.6; ``benchmarks/results/group_norm_h200.md``). At 2x32x128^3 bf16, against medgn 0.1's 2048
# elements for every kernel, in one run: forward 0.296 -> 0.243 ms (contiguous; the apply kernel
# streams better with 1024-element tiles of 4 warps) and 0.367 -> 0.241 ms (channels_last, 8192
# elements), channels_last backward 0.653 -> 0.443 ms (2048 elements of 4 warps; 8192 made its dx
# kernel 2-4x slower). float32: forward 0.441 -> 0.417 ms (contiguous) and 0.501 -> 0.426 ms
# (channels_last), channels_last backward 4.80 -> 1.48 ms (8192 elements).
_TILES_16BIT = {("fwd", False): (1024, None), ("fwd", True): (8192, None),
                ("bwd", False): (2048, None), ("bwd", True): (2048, 4)}  # fmt: skip
_TILES_FP32 = {("fwd", False): (1024, None), ("fwd", True): (8192, None),
               ("bwd", False): (2048, None), ("bwd", True): (8192, None)}  # fmt: skip
# Tests and the sm_90 compile check plan CPU (meta) tensors as GPU ones: GPU tiles, and
# ``_CPU_PROGRAMS`` taken as the SM count.
_GPU_TILES_ON_CPU = False
# Largest group block the fused kernels keep on chip (1 read + 1 write): 16384 fp32 values are
# 32 registers per thread at 16 warps (x and its centred copy: ~100 registers, no spill); the
# backward holds x, dy and dz, so half of that. This covers 16^3 x 4 and 8^3 x 32 channels.
_FUSED_MAX = 16384
_FUSED_BWD_MAX = 8192
# channels_last tiles: up to 128 channels (256 bytes of bf16) of one voxel, made of whole groups,
# so a 2-8-channel group is read as part of a contiguous run instead of a scattered 4-16 bytes.
_CL_CHANNELS = 128
# Software-pipelining depth of the streaming loops (tl.range num_stages): 3 tiles in flight.
_STAGES = 3
# Hopper/Ampere: 64 resident warps and 32 resident blocks per SM bound a full wave of programs.
_SM_WARPS = 64
_SM_BLOCKS = 32
# CPU interpreter: no SMs or L2; 16 programs and a 96 KiB "L2" keep test grids small while still
# giving several splits and several chunks on the test shapes.
_CPU_PROGRAMS = 16
_CPU_L2_BYTES = 96 * 1024
# Upper bound on splits per group: the apply and dx kernels load all partials of a group at once.
_MAX_SPLITS = 512
PATHS = ("auto", "fused", "split", "chunked")


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _warps(block: int) -> int:
    """Warps for a tile of ``block`` elements: about 8 elements per thread, 4 to 16 warps."""
    return max(4, min(16, block // 256))


def _pow2_divisor_upto(g: int, limit: int) -> int:
    """Largest power of two dividing g and at most limit (at least 1)."""
    d = 1
    while d * 2 <= limit and g % (d * 2) == 0:
        d *= 2
    return d


def _groups_per_block(x: torch.Tensor, num_groups: int, block_c: int, limit: int) -> int:
    """GPB: 1 on contiguous inputs; on channels_last as many whole groups as fit ``limit`` lanes."""
    if not _is_channels_last(x):
        return 1
    return _pow2_divisor_upto(num_groups, max(1, limit // block_c))


@dataclass(frozen=True)
class _Plan:
    """Tile sizes, split count and launch chunking of one call (see the module docstring)."""

    S: int
    CPG: int
    GPB: int
    BLOCK_C: int
    BLOCK_S: int
    S_PER_SPLIT: int
    SPLITS: int
    SPLITS_P2: int
    rows: int  # group blocks: N * G // GPB
    chunk_rows: int  # group blocks per launch
    warps: int


def _device_limits(x: torch.Tensor) -> tuple[int, int]:
    """(SM count, L2 bytes / 3) of x's device; CPU stand-ins (programs, "L2" budget) otherwise."""
    if not x.is_cuda:
        return _CPU_PROGRAMS, _CPU_L2_BYTES
    props = torch.cuda.get_device_properties(x.device)
    # A third of L2 for the chunk being re-read: the writes of the second pass also go through L2.
    return props.multi_processor_count, props.L2_cache_size // 3


def _planned_as_gpu(x: torch.Tensor) -> bool:
    """True when x is planned with GPU tiles and occupancy (CUDA, or tests that ask for it)."""
    return x.is_cuda or _GPU_TILES_ON_CPU


def _tile(x: torch.Tensor, direction: str) -> tuple[int, int | None]:
    """(elements per tile, warps or None for the ``_warps`` rule) of a pass over x."""
    if not _planned_as_gpu(x):
        return _TILE_CPU, None
    table = _TILES_16BIT if x.element_size() == 2 else _TILES_FP32
    return table[(direction, _is_channels_last(x))]


def _plan(x: torch.Tensor, num_groups: int, chunk_tensors: int, chunked: bool) -> _Plan:
    """Plan of the split/chunked kernels for x seen as (N, G, C//G, S).

    ``chunk_tensors`` is how many tensors of x's size the second pass re-reads (1 forward, 2-3
    backward): a chunk of group blocks holds at most a third of L2 of them. Plans of CUDA tensors
    are cached by what they depend on (a plan took about 30 us of host time per call).
    """
    if not x.is_cuda:
        return _make_plan(x, num_groups, chunk_tensors, chunked)
    key = (tuple(x.shape), _is_channels_last(x), x.element_size(), x.device.index, num_groups, chunk_tensors, chunked)
    p = _PLANS.get(key)
    if p is None:
        if len(_PLANS) >= _MAX_PLANS:  # whole scans of many sizes: start over rather than grow
            _PLANS.clear()
        p = _PLANS[key] = _make_plan(x, num_groups, chunk_tensors, chunked)
    return p


# Plans of CUDA tensors by _plan's key; benchmarks that change the planner's constants clear it.
_PLANS: dict[tuple, _Plan] = {}
_MAX_PLANS = 4096


def _make_plan(x: torch.Tensor, num_groups: int, chunk_tensors: int, chunked: bool) -> _Plan:
    """The plan of :func:`_plan`, computed."""
    n, c = x.shape[:2]
    s = math.prod(x.shape[2:])
    cpg = c // num_groups
    tile, fixed_warps = _tile(x, "fwd" if chunk_tensors == 1 else "bwd")
    block_c = min(_next_pow2(cpg), tile)
    sms, l2_bytes = _device_limits(x)
    # Every second-pass program reads all partials of its groups (8 bytes x SPLITS per group
    # forward, per channel backward) from L2 while streaming S / SPLITS voxels of them: capping
    # SPLITS at sqrt(bytes per group (per channel backward) / 32) keeps those L2 reads under a
    # quarter of the program's own HBM bytes.
    per = (1 if chunk_tensors > 1 else cpg) * s * x.element_size()
    split_cap = max(1, math.isqrt(per // 32))
    gpb = _groups_per_block(x, num_groups, block_c, min(_CL_CHANNELS, tile // 16))
    # channels_last blocks keep >= 32 channels (64 bytes of bf16, two sectors) when C has them:
    # fewer would turn each voxel's read into a partial-sector gather.
    min_gpb = min(gpb, max(1, 32 // block_c))
    while True:
        block_s = max(1, min(_next_pow2(s), tile // (gpb * block_c)))
        warps = fixed_warps or _warps(gpb * block_c * block_s)
        # One full wave of resident programs (no partial second wave): per SM, as many programs
        # as the warp and block limits allow.
        programs = sms * min(_SM_BLOCKS, _SM_WARPS // warps) if _planned_as_gpu(x) else sms
        rows = n * num_groups // gpb
        # Fewer groups per channels_last block when the capped splits cannot fill the wave.
        if gpb <= min_gpb or rows * min(split_cap, -(-s // block_s)) >= programs:
            break
        gpb //= 2
    row_bytes = gpb * cpg * s * x.element_size() * chunk_tensors
    # At least 1: an empty batch (N = 0) has no rows and must launch nothing, not divide by 0.
    chunk_rows = max(1, min(rows, l2_bytes // row_bytes) if chunked else rows)
    # Splits per group block: at most one full wave in all (floor, not ceil: every program streams
    # S / SPLITS voxels, so a partial second wave of even a few programs doubles the pass).
    want = max(1, min(_MAX_SPLITS, split_cap, programs // chunk_rows, -(-s // block_s)))
    s_per_split = -(-s // want)
    s_per_split = -(-s_per_split // block_s) * block_s  # whole tiles per split
    splits = -(-s // s_per_split)
    return _Plan(s, cpg, gpb, block_c, block_s, s_per_split, splits, _next_pow2(splits), rows,
                 chunk_rows, warps)  # fmt: skip


def _fused_block(x: torch.Tensor, num_groups: int, limit: int) -> tuple[int, int, int] | None:
    """(GPB, BLOCK_C, BLOCK_S) of the fused kernels when a group block fits ``limit``, else None."""
    cpg = x.shape[1] // num_groups
    block_c, block_s = _next_pow2(cpg), _next_pow2(math.prod(x.shape[2:]))
    if block_c * block_s > limit:
        return None
    gpb = _groups_per_block(x, num_groups, block_c, min(_CL_CHANNELS, limit // block_s))
    return gpb, block_c, block_s


def fused_launch_block(x: torch.Tensor, num_groups: int, direction: str) -> tuple[int, int, int]:
    """(GPB, BLOCK_C, BLOCK_S) the fused kernels launch with for a ``direction`` pass.

    The block "auto" chose (at most ``_FUSED_MAX`` / ``_FUSED_BWD_MAX`` elements), or one group
    when the fused path is asked for on a larger group. (medgn 0.1 launched with an unbounded
    limit, so a channels_last input packed up to 128 channels of whole volumes into one program:
    262144 elements at 2x64x16^3, 25 s to compile and spilling.)
    """
    limit = _FUSED_MAX if direction == "fwd" else _FUSED_BWD_MAX
    one_group = _next_pow2(x.shape[1] // num_groups) * _next_pow2(math.prod(x.shape[2:]))
    block = _fused_block(x, num_groups, max(limit, one_group))
    assert block is not None  # the limit holds one group
    return block


def forward_path(x: torch.Tensor, num_groups: int, path: str = "auto") -> str:
    """The concrete forward path ("fused", "split" or "chunked") that ``path`` resolves to."""
    if path not in PATHS:
        raise ValueError(f"group_norm_forward: unknown path {path!r}, expected one of {PATHS}")
    if path != "auto":
        return path
    return "fused" if _fused_block(x, num_groups, _FUSED_MAX) else "split"


def backward_path(x: torch.Tensor, num_groups: int, path: str = "auto") -> str:
    """The concrete backward path that ``path`` resolves to (see :func:`forward_path`)."""
    if path not in PATHS:
        raise ValueError(f"group_norm_backward: unknown path {path!r}, expected one of {PATHS}")
    if path != "auto":
        return path
    return "fused" if _fused_block(x, num_groups, _FUSED_BWD_MAX) else "split"


def moved_volumes(path: str, direction: str, residual: bool, activation: str, need_dres: bool = True) -> float:
    """Tensor volumes a path moves from/to memory (the module docstring's table).

    For "chunked" this is the HBM traffic when the second pass's re-read hits L2 (what the path
    is designed for); :func:`moved_volumes` of "split" is its upper bound.
    """
    res = 1.0 if residual else 0.0
    res_act = res if activation != "none" else 0.0
    dres = res if need_dres else 0.0
    if direction == "fwd":
        return {"fused": 2.0, "split": 3.0, "chunked": 2.0}[path] + res
    if direction == "bwd":
        return {"fused": 3.0 + res_act, "split": 5.0 + 2 * res_act, "chunked": 3.0 + res_act}[path] + dres
    raise ValueError(f"moved_volumes: direction {direction!r}, expected 'fwd' or 'bwd'")


def planned_volumes(
    x: torch.Tensor,
    num_groups: int,
    direction: str,
    residual: bool,
    activation: str,
    need_dres: bool = True,
) -> tuple[str, float]:
    """(path, tensor volumes moved) of an "auto" call on x: what a benchmark should count.

    The second pass of a split or chunked call re-reads from L2 only when one launch's group
    blocks fit the L2 budget (a third of L2): a split call on a small tensor, a chunked call
    whose group block is not larger than the budget. Otherwise it moves the split path's volumes.
    """
    if direction == "fwd":
        path = forward_path(x, num_groups)
        tensors = 1
    else:
        path = backward_path(x, num_groups)
        tensors = 2 + (residual and activation != "none")
    if path != "fused":
        p = _plan(x, num_groups, tensors, chunked=path == "chunked")
        launch_bytes = p.chunk_rows * p.GPB * p.CPG * p.S * x.element_size() * tensors
        hits = "chunked" if launch_bytes <= _device_limits(x)[1] else "split"
        return path, moved_volumes(hits, direction, residual, activation, need_dres)
    return path, moved_volumes(path, direction, residual, activation, need_dres)
