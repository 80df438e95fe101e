"""Multi-process training with torchrun: process-group setup, DDP wrapping, small collectives.

When ``RANK`` and ``WORLD_SIZE`` are in the environment (torchrun sets them), :func:`init_distributed`
joins the process group (NCCL on GPUs, gloo on the CPU) and pins the local GPU. Only rank 0 writes
checkpoints and logs; the helpers here gather per-rank RNG states for the checkpoint and agree on
stop/save decisions so every rank leaves the loop at the same step. GroupNorm statistics are per
sample, so no SyncBatchNorm is needed.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from medgn.errors import UsageError


@dataclass(frozen=True)
class DistInfo:
    """Rank layout of this process (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when running under a process group with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the process that writes files."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise UsageError(
            name, "environment variable is not an integer", got=raw, expected="an integer set by torchrun"
        ) from None


def dist_info_from_env() -> DistInfo:
    """Rank layout from torchrun's environment variables."""
    from medgn.environment import local_rank

    return DistInfo(rank=_env_int("RANK", 0), world_size=_env_int("WORLD_SIZE", 1), local_rank=local_rank() or 0)


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun; return this process's layout.

    Args:
        device_type: ``"cuda"`` (NCCL backend, one GPU per local rank) or ``"cpu"`` (gloo).
    """
    info = dist_info_from_env()
    if not info.enabled or (dist.is_available() and dist.is_initialized()):
        return info
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return info


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def any_flags(flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise OR of boolean flags over all ranks (identity when not distributed)."""
    if not active():
        return flags
    backend_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=backend_device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` on every rank (``[obj]`` when not distributed)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if active():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group if one was joined.

    gloo's worker threads drop their last references to finished collectives (tensors with Python
    objects) after the caller's wait returns, and need the GIL for that; the process group's
    destructor joins those threads while holding the GIL, so destroying the group while a worker
    thread still waits for the GIL deadlocks (a hang after the last step of a gloo run). A barrier
    ends every collective, and a short sleep releases the GIL so the workers can finish first.
    """
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(RuntimeError):  # a peer that already failed must not block the exit
            dist.barrier()
        gc.collect()  # DDP reducers and buckets left from training
        time.sleep(0.2)  # GIL released: gloo threads finish releasing finished work
        dist.destroy_process_group()
