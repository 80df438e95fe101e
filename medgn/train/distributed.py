"""Multi-process training with torchrun: process-group setup, DDP wrapping, small collectives.

When ``RANK`` and ``WORLD_SIZE`` are in the environment (torchrun sets them), :func:`init_distributed`
joins the process group (NCCL on GPUs, gloo on the CPU) and pins the local GPU. Only rank 0 writes
checkpoints and logs; the helpers here gather per-rank RNG states for the checkpoint and agree on
stop/save decisions so every rank leaves the loop at the same step. GroupNorm statistics are per
sample, so no SyncBatchNorm is needed.

The environment is checked before the process group is joined (:func:`dist_info_from_env`), since a
leaked or hand-written one otherwise fails deep inside PyTorch or waits 30 minutes for ranks that
never come: ``WORLD_SIZE`` must be positive, ``0 <= RANK < WORLD_SIZE``, ``0 <= LOCAL_RANK <
LOCAL_WORLD_SIZE`` (and a visible GPU), and ``MASTER_ADDR``/``MASTER_PORT`` set when more than one
process takes part (exit 2 naming the variables). A group that cannot be joined is named with its
address: a busy ``MASTER_PORT`` is exit 2, no answer or a timeout exit 5. Ranks started without
torchrun wait five minutes (``MEDGN_JOIN_TIMEOUT`` seconds) for the others, not PyTorch's 30. A peer that dies mid-run
breaks the collectives of the others: :func:`peer_failure` recognises that error, which the CLI
reports as "another rank stopped" (exit 5: the job lost a process, a machine or a connection)
rather than as a bug.
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

from medgn.environment import RENDEZVOUS_VARS
from medgn.errors import ResourceError, UsageError, brief

# Seconds a rank started without torchrun waits for the others (MEDGN_JOIN_TIMEOUT overrides).
JOIN_TIMEOUT_S = 300.0

# What a collective says when a peer process is gone (gloo over TCP; NCCL's communicator).
PEER_LOST_TEXT = (
    "gloo/transport",
    "connection reset by peer",
    "connection closed by peer",
    "broken pipe",
    "nccl communicator",
    "processgroupnccl",
    "processgroupgloo",
)


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


def _launch(env: Any) -> str:
    """The rank variables as set, for messages: ``RANK=5 WORLD_SIZE=2``."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    return " ".join(f"{n}={env[n]}" for n in names if n in env) or "none set"


def dist_info_from_env() -> DistInfo:
    """Rank layout from torchrun's environment variables, checked before any process group is joined.

    Raises:
        UsageError: a variable is not an integer, ``WORLD_SIZE`` < 1, ``RANK`` outside ``[0,
            WORLD_SIZE)``, ``LOCAL_RANK`` outside ``[0, LOCAL_WORLD_SIZE)`` or above ``RANK``, or
            several processes without ``MASTER_ADDR``/``MASTER_PORT`` (exit 2).
    """
    from medgn.environment import local_rank

    env = os.environ
    fix = "a torchrun launch, or unset RANK, WORLD_SIZE and LOCAL_RANK for one process"
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size < 1:
        raise UsageError("WORLD_SIZE", "the number of processes must be positive", got=world_size, expected=fix)
    rank = _env_int("RANK", 0)
    if not 0 <= rank < world_size:
        got = _launch(env) + ("" if "WORLD_SIZE" in env else ", WORLD_SIZE unset: 1 process")
        raise UsageError("RANK", "rank outside the world size", got=got, expected=f"0 <= RANK < WORLD_SIZE: {fix}")
    local = local_rank()
    local_world = _env_int("LOCAL_WORLD_SIZE", world_size)
    # One process may pick its GPU with LOCAL_RANK alone (plain `cuda` is cuda:LOCAL_RANK); several must agree.
    spread = world_size > 1 and not (local is None or local < min(local_world, world_size) and local <= rank)
    if local is not None and local < 0 or spread:
        raise UsageError(
            "LOCAL_RANK",
            "local rank outside this machine's processes",
            got=_launch(env),
            expected=f"0 <= LOCAL_RANK < LOCAL_WORLD_SIZE <= WORLD_SIZE and LOCAL_RANK <= RANK: {fix}",
        )
    missing = [name for name in RENDEZVOUS_VARS if not env.get(name)]
    if world_size > 1 and missing:
        raise UsageError(
            ", ".join(missing),
            "several processes but no rendezvous address",
            got=f"{_launch(env)}, {' and '.join(missing)} unset",
            expected=fix,
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local or 0)


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun; return this process's layout.

    Args:
        device_type: ``"cuda"`` (NCCL backend, one GPU per local rank) or ``"cpu"`` (gloo).
    """
    info = dist_info_from_env()
    if not info.enabled or (dist.is_available() and dist.is_initialized()):
        return info
    if device_type == "cuda":
        count = torch.cuda.device_count()
        if info.local_rank >= count:
            raise UsageError(
                "LOCAL_RANK",
                "no GPU for this local rank",
                got=f"LOCAL_RANK={info.local_rank}, {count} visible GPU(s)",
                expected="--nproc_per_node at most the number of visible GPUs (CUDA_VISIBLE_DEVICES)",
            )
        torch.cuda.set_device(info.local_rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    try:
        store = _join_store(info)
        if store is None:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=store, rank=info.rank, world_size=info.world_size)
    except dist.DistError as exc:
        raise _join_failure(exc) from exc
    return info


def join_timeout_seconds() -> float:
    """How long a hand-launched rank waits for the others to join: ``MEDGN_JOIN_TIMEOUT`` seconds,
    default :data:`JOIN_TIMEOUT_S`."""
    raw = os.environ.get("MEDGN_JOIN_TIMEOUT")
    if raw is None or raw.strip() == "":
        return JOIN_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 7 * 24 * 3600:
        raise UsageError(
            "MEDGN_JOIN_TIMEOUT", "environment variable is not a number of seconds", got=raw, expected="e.g. 300"
        )
    return value


def _join_store(info: DistInfo) -> Any:
    """The rendezvous store for a rank started without torchrun's agent (``WORLD_SIZE``, ``RANK`` and
    ``MASTER_*`` set by hand or by a scheduler), or None under torchrun, whose agent hosts the store and
    has already gathered every process.

    PyTorch's own ``env://`` join waits its collective timeout, 30 minutes, for ranks that never come
    (``WORLD_SIZE=2`` with one process started); here rank 0 waits :func:`join_timeout_seconds` for the
    others to connect and the others as long to reach it, then the store keeps PyTorch's timeout for
    the rest of the run.
    """
    from datetime import timedelta

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return None
    try:
        port = int(os.environ["MASTER_PORT"])
    except ValueError:
        port = -1
    if not 0 < port < 2**16:
        raise UsageError("MASTER_PORT", "not a TCP port", got=os.environ["MASTER_PORT"], expected="1-65535")
    if info.rank != 0:
        _wait_for_rank_0(os.environ["MASTER_ADDR"], port, join_timeout_seconds())
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        port,
        info.world_size,
        is_master=info.rank == 0,
        timeout=timedelta(seconds=join_timeout_seconds()),
        wait_for_workers=True,
        multi_tenant=True,
    )
    store.set_timeout(dist.default_pg_timeout)
    return store


def _wait_for_rank_0(address: str, port: int, timeout_s: float) -> None:
    """Wait until rank 0's store accepts connections (PyTorch's client prints a C++ stack trace on every
    retry while it waits).

    Raises:
        ResourceError: nothing answered at ``address:port`` within ``timeout_s`` seconds (exit 5).
    """
    import socket

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((address, port), timeout=min(5.0, timeout_s)):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise ResourceError(
                    "",
                    f"cannot join the process group at {address}:{port}: rank 0 did not answer in {timeout_s:g} s",
                    got=brief(exc, 80),
                    expected="rank 0 started with the same MASTER_ADDR and MASTER_PORT, reachable from this machine "
                    "(MEDGN_JOIN_TIMEOUT sets the wait)",
                ) from exc
        time.sleep(0.5)


def _join_failure(exc: BaseException) -> UsageError | ResourceError:
    """The error for a process group that could not be joined: a busy ``MASTER_PORT`` is the user's to
    change (exit 2); anything else (no answer from the address, a timeout) is the network's (exit 5).
    Without this, a failed join read as "another rank stopped"."""
    where = f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"
    reason = brief(exc, 160)
    if "EADDRINUSE" in str(exc) or "address already in use" in str(exc).lower():
        return UsageError(
            "MASTER_PORT",
            f"cannot start the process group at {where}: the port is in use",
            expected="a free port (torchrun --master-port, or MASTER_PORT)",
        )
    expected = "every rank started with the same MASTER_ADDR and MASTER_PORT, reachable from this machine"
    if "timed out" in str(exc).lower() and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        expected = (
            f"all WORLD_SIZE={os.environ.get('WORLD_SIZE', '')} ranks started within "
            f"{join_timeout_seconds():g} s (MEDGN_JOIN_TIMEOUT) with the same MASTER_ADDR and MASTER_PORT"
        )
    return ResourceError("", f"cannot join the process group at {where}", got=reason, expected=expected)


def peer_failure(exc: BaseException | None) -> BaseException | None:
    """The error in ``exc``'s chain that says another process of the group is gone, or None.

    A rank killed mid-run (``kill -9``, the OOM killer, a lost machine) leaves the others with a
    ``DistError`` or a gloo/NCCL ``RuntimeError`` ("Connection reset by peer") at their next
    collective. Only meaningful under torchrun (``WORLD_SIZE`` > 1); the caller checks that.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, dist.DistError):
            return exc
        if isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in PEER_LOST_TEXT):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


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
