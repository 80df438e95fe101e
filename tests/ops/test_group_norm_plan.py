"""Launch planning of the GroupNorm kernels on an H100-like device (pure Python, meta tensors)."""

from __future__ import annotations

import pytest
import torch

import medgn.ops.group_norm_plan as plan

H100_SMS, H100_L2 = 132, 50 * 2**20


@pytest.fixture
def h100(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors planned with an H100's tile size, SM count and L2 budget."""
    monkeypatch.setattr(plan, "_GPU_TILES_ON_CPU", True)
    monkeypatch.setattr(plan, "_CPU_PROGRAMS", H100_SMS)
    monkeypatch.setattr(plan, "_CPU_L2_BYTES", H100_L2 // 3)


def _x(shape: tuple[int, ...], channels_last: bool) -> torch.Tensor:
    x = torch.empty(shape, dtype=torch.bfloat16, device="meta")
    return x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    ("shape", "g"),
    [((2, 32, 128, 128, 128), 32), ((2, 32, 128, 128, 128), 8), ((2, 64, 64, 64, 64), 16),
     ((2, 128, 32, 32, 32), 32), ((2, 32, 32, 32, 32), 16)],
)  # fmt: skip
@pytest.mark.parametrize("tensors", [1, 2])
def test_plans_cover_every_voxel_within_limits(shape, g, channels_last, tensors, h100) -> None:
    x = _x(shape, channels_last)
    p = plan._plan(x, g, tensors, chunked=True)
    # Splits tile S exactly, in whole tiles, and stay under the partial-read cap.
    assert p.SPLITS * p.S_PER_SPLIT >= p.S > (p.SPLITS - 1) * p.S_PER_SPLIT
    assert p.S_PER_SPLIT % p.BLOCK_S == 0 and p.SPLITS <= plan._MAX_SPLITS
    assert p.SPLITS_P2 >= p.SPLITS and p.SPLITS_P2 & (p.SPLITS_P2 - 1) == 0
    # A tile is at most the 16-bit table's size for its pass and layout; a group block is whole
    # groups of one sample.
    tile, warps = plan._TILES_16BIT[("fwd" if tensors == 1 else "bwd", channels_last)]
    assert p.GPB * p.BLOCK_C * p.BLOCK_S <= tile and g % p.GPB == 0
    assert p.rows * p.GPB == shape[0] * g
    # A launch is at most one wave of resident programs (64 warps and 32 programs per SM).
    assert p.warps == (warps or plan._warps(p.GPB * p.BLOCK_C * p.BLOCK_S))
    assert p.chunk_rows * p.SPLITS <= H100_SMS * min(32, 64 // p.warps) * 1.05
    # A chunk fits the L2 budget unless a single group block is larger than it.
    row_bytes = p.GPB * p.CPG * p.S * 2 * tensors
    assert p.chunk_rows == 1 or p.chunk_rows * row_bytes <= H100_L2 // 3
    if channels_last:  # >= 32 contiguous channels per voxel read (C >= 32 here)
        assert p.GPB * p.CPG >= 32
    else:
        assert p.GPB == 1


def test_paths_and_volumes(h100) -> None:
    # Deep level: fused both ways, the minimal 2 + 3 volumes.
    assert plan.planned_volumes(_x((2, 320, 8, 8, 8), False), 32, "fwd", False, "none") == (
        "fused",
        2,
    )
    assert plan.planned_volumes(_x((2, 320, 8, 8, 8), True), 32, "bwd", False, "silu") == (
        "fused",
        3,
    )
    # 128^3: "auto" streams with split (2 launches each way), whose 256 MiB re-read misses L2.
    for channels_last in (False, True):
        x = _x((2, 32, 128, 128, 128), channels_last)
        assert plan.planned_volumes(x, 32, "fwd", False, "none") == ("split", 3)
        assert plan.planned_volumes(x, 32, "fwd", True, "none") == ("split", 4)
        assert plan.planned_volumes(x, 32, "bwd", True, "silu") == ("split", 8)  # + r twice + dres
        assert plan.planned_volumes(x, 32, "bwd", False, "none", need_dres=False) == ("split", 5)
    # 32^3 x 32 channels: 4 MiB, inside the L2 budget -> the re-read hits, 2 and 3 volumes.
    x = _x((2, 32, 32, 32, 32), False)
    assert plan.planned_volumes(x, 32, "fwd", False, "none") == ("split", 2)
    assert plan.planned_volumes(x, 32, "bwd", False, "none", need_dres=False) == ("split", 3)


def test_auto_takes_two_launches_each_way_on_large_tensors(h100) -> None:
    """Chunking a 2x32x128^3 tensor into L2-sized launches took 26 launches forward and 64
    backward, launch-bound on an H200: "auto" makes one launch per pass instead."""
    x = _x((2, 32, 128, 128, 128), False)
    assert plan.forward_path(x, 32) == plan.backward_path(x, 32) == "split"
    chunked, split = plan._plan(x, 32, 1, chunked=True), plan._plan(x, 32, 1, chunked=False)
    assert -(-chunked.rows // chunked.chunk_rows) >= 13 and split.chunk_rows == split.rows == 64
    # One wave, no partial second one: 1024-element tiles of 4 warps, 16 programs per SM; 64 groups x
    # 33 splits = 2112 programs of 2112 slots.
    assert split.SPLITS == 33 and split.rows * split.SPLITS <= H100_SMS * 16


def test_unknown_path_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown path 'fast'"):
        plan.forward_path(_x((1, 4, 2, 2, 2), False), 2, "fast")


@pytest.mark.parametrize(
    ("dtype", "channels_last", "fwd", "bwd"),
    [(torch.bfloat16, False, (1024, 4), (2048, 8)), (torch.float16, True, (8192, 16), (2048, 4)),
     (torch.float32, False, (1024, 4), (2048, 8)), (torch.float32, True, (8192, 16), (8192, 16))],
)  # fmt: skip
def test_gpu_tiles_follow_the_measured_table(dtype, channels_last, fwd, bwd, h100) -> None:
    """Tiles follow the tables measured per pass, layout and element size."""
    x = torch.empty((2, 32, 128, 128, 128), dtype=dtype, device="meta")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    for tensors, (tile, warps) in ((1, fwd), (2, bwd)):
        p = plan._plan(x, 32, tensors, chunked=False)
        assert (p.GPB * p.BLOCK_C * p.BLOCK_S, p.warps) == (tile, warps)


class _FakeCudaTensor:
    """Just what _plan reads before planning, for a CUDA tensor on a machine without one."""

    is_cuda = True
    shape = (2, 32, 16, 16, 16)
    device = torch.device("cuda", 0)

    def dim(self) -> int:
        return 5

    def is_contiguous(self, memory_format: torch.memory_format = torch.contiguous_format) -> bool:
        return memory_format == torch.contiguous_format

    def element_size(self) -> int:
        return 2


def test_cuda_plans_are_made_once_per_key(monkeypatch: pytest.MonkeyPatch) -> None:
    made = []
    monkeypatch.setattr(plan, "_PLANS", {})
    monkeypatch.setattr(plan, "_make_plan", lambda x, g, tensors, chunked: made.append((g, tensors)) or len(made))
    x = _FakeCudaTensor()
    assert plan._plan(x, 32, 1, False) == plan._plan(x, 32, 1, False) == 1
    assert plan._plan(x, 8, 1, False) == 2 and plan._plan(x, 32, 2, False) == 3  # another key: planned
    assert made == [(32, 1), (8, 1), (32, 2)]
    monkeypatch.setattr(plan, "_MAX_PLANS", 3)  # full: the next new key starts the cache over
    assert plan._plan(x, 4, 1, False) == 4 and len(plan._PLANS) == 1


@pytest.mark.parametrize(
    ("shape", "g", "channels_last", "direction", "expected"),
    [((2, 64, 16, 16, 16), 16, True, "fwd", (1, 4, 4096)), ((2, 320, 8, 8, 8), 32, True, "fwd", (2, 16, 512)),
     ((2, 320, 8, 8, 8), 32, True, "bwd", (1, 16, 512)), ((2, 320, 8, 8, 8), 32, False, "fwd", (1, 16, 512)),
     ((1, 8, 32, 32, 32), 2, True, "fwd", (1, 4, 32768))],
)  # fmt: skip
def test_fused_launch_block_stays_within_the_fused_limit(shape, g, channels_last, direction, expected) -> None:
    """channels_last used to pack up to 128 channels of whole volumes into one fused program; the
    launch block is now the one the path decision checked, or one group when fused is forced."""
    x = _x(shape, channels_last)
    block = plan.fused_launch_block(x, g, direction)
    assert block == expected
    limit = plan._FUSED_MAX if direction == "fwd" else plan._FUSED_BWD_MAX
    one_group = expected[1] * expected[2]
    assert block[0] * one_group <= max(limit, one_group)
