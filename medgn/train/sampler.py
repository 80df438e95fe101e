"""Data order as a pure function of (seed, epoch, position): what makes exact resume possible.

:class:`ResumableSampler` yields the case indices of one epoch from a ``torch.Generator`` seeded by
``(seed, epoch)``, concatenating fresh permutations until the epoch's sample count is reached,
sharded by rank for DDP, and starts ``position`` samples in after a resume. With ``with_seeds`` it
yields ``(case_index, sample_seed)`` pairs whose seed depends only on (seed, global sample index),
so augmentation randomness never comes from RNG state that workers consume. :class:`ResumableLoader`
is the batch source the :class:`~medgn.train.trainer.Trainer` calls as ``source(epoch, start)``.

Its worker processes leave SIGTERM and SIGINT to the main process: ``timeout``, systemd, SLURM and
a terminal's Ctrl-C signal the whole process group, and a worker killed by that signal would end the
run with "DataLoader worker ... is killed by signal" instead of the main process finishing its step,
checkpointing and exiting 143/130. Workers are forked with both signals blocked (so none arrives
before they are set up); they then ignore SIGINT, and exit on SIGTERM only when their parent sends
it (the DataLoader's own shutdown), which a thread waiting for the signal can tell from its sender.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from medgn.errors import UsageError

# The trainer calls source(epoch, start_micro_batch) and iterates micro-batches from there.
BatchSource = Callable[[int, int], Iterable[Mapping[str, Any]]]


def sample_seed(seed: int, global_index: int) -> int:
    """A 63-bit seed for one sample, mixing (seed, global sample index) through numpy's SeedSequence."""
    words = np.random.SeedSequence([seed, global_index]).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1]))  # < 2**63: fits torch.Generator and int64


class ResumableSampler(Sampler):
    """Indices of one epoch, deterministic in (seed, epoch), resumable at any position.

    Args:
        num_cases: size of the dataset.
        samples_per_epoch: samples this rank draws per epoch.
        seed: run seed.
        rank: this process's rank.
        world_size: number of processes; global order is sharded round-robin.
        with_seeds: yield ``(index, sample_seed)`` pairs instead of bare indices.
    """

    def __init__(
        self,
        num_cases: int,
        samples_per_epoch: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        with_seeds: bool = False,
    ) -> None:
        if num_cases < 1:
            raise UsageError("data", "no training cases", got=num_cases, expected="at least 1 case")
        if not 0 <= rank < world_size:
            raise UsageError("RANK", "rank outside the world size", got=rank, expected=f"0 <= rank < {world_size}")
        self.num_cases = num_cases
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.with_seeds = with_seeds
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and the number of this rank's samples already consumed in it."""
        self.epoch = epoch
        self.start = start

    def global_order(self, epoch: int) -> list[int]:
        """Case indices of the whole epoch across all ranks."""
        total = self.samples_per_epoch * self.world_size
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)  # 1_000_003: prime, no epoch/seed aliasing
        order: list[int] = []
        while len(order) < total:
            order.extend(torch.randperm(self.num_cases, generator=gen).tolist())
        return order[:total]

    def __iter__(self) -> Iterator[Any]:
        order = self.global_order(self.epoch)
        base = self.epoch * self.samples_per_epoch * self.world_size
        for local in range(self.start, self.samples_per_epoch):
            position = local * self.world_size + self.rank
            if self.with_seeds:
                yield order[position], sample_seed(self.seed, base + position)
            else:
                yield order[position]

    def __len__(self) -> int:
        return self.samples_per_epoch - self.start


# What a group-wide stop sends; the main process alone decides how to stop (SignalHook).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block SIGTERM and SIGINT in this thread meanwhile; processes forked meanwhile start with them blocked.

    A signal arriving meanwhile stays pending and is delivered (to the main process's handler) on exit.
    Outside the main thread, or where the platform has no signal masks, it does nothing.
    """
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _exit_on_parents_sigterm(parent: int) -> None:
    """Wait for SIGTERM (blocked in every thread of this worker); exit only when ``parent`` sent it."""
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent or os.getppid() != parent:  # the DataLoader's terminate(), or orphaned
            os._exit(0)


class WorkerInit:
    """A DataLoader ``worker_init_fn`` that leaves stop signals to the main process, then runs ``then``.

    SIGINT is ignored. SIGTERM stays blocked and a daemon thread takes it: the parent's own
    ``terminate()`` (the DataLoader shutting its workers down) still ends the worker, a SIGTERM from
    anyone else (a whole process group being stopped) is dropped. A worker also exits by itself once
    its parent is gone (PyTorch's watchdog). Picklable, so it works with every start method.

    Args:
        then: the caller's own ``worker_init_fn`` (seeding, ...), called with the worker id.
    """

    def __init__(self, then: Callable[[int], None] | None = None) -> None:
        self.then = then

    def __call__(self, worker_id: int) -> None:
        if hasattr(signal, "pthread_sigmask") and hasattr(signal, "sigwaitinfo"):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # before the thread: it inherits the mask
            parent = os.getppid()
            threading.Thread(target=_exit_on_parents_sigterm, args=(parent,), daemon=True).start()
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a pending SIGINT is dropped
        if self.then is not None:
            self.then(worker_id)


class _Loader(DataLoader):
    """A DataLoader whose worker processes are started with the stop signals blocked (see WorkerInit)."""

    def __iter__(self) -> Any:
        if self.num_workers == 0:
            return super().__iter__()
        with stop_signals_blocked():  # the workers fork here
            return super().__iter__()


class ResumableLoader:
    """A batch source: ``loader(epoch, start)`` iterates the epoch's micro-batches from ``start``.

    Args:
        dataset: map-style dataset; receives what the sampler yields.
        sampler: the resumable sampler (its ``samples_per_epoch`` must be a multiple of batch size).
        batch_size: samples per micro-batch.
        **loader_kwargs: passed to :class:`torch.utils.data.DataLoader` (workers, collate_fn, ...);
            a ``worker_init_fn`` runs after the workers' signal set-up (:class:`WorkerInit`).
    """

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, batch_size: int, **loader_kwargs: Any) -> None:
        if sampler.samples_per_epoch % batch_size:
            raise UsageError(
                "train.batch_size", "samples per epoch must be a multiple of the batch size", got=batch_size
            )
        self.dataset = dataset
        self.sampler = sampler
        self.batch_size = batch_size
        self.loader_kwargs = loader_kwargs

    def __call__(self, epoch: int, start: int) -> Iterable[Mapping[str, Any]]:
        self.sampler.set_epoch(epoch, start * self.batch_size)
        # An explicit generator: otherwise each new DataLoader iterator draws its worker base seed
        # from the global torch RNG, and a resumed run (which creates one mid-epoch) would diverge.
        kwargs = {
            "generator": torch.Generator().manual_seed(self.sampler.seed * 1_000_003 + epoch),
            **self.loader_kwargs,
        }
        kwargs["worker_init_fn"] = WorkerInit(kwargs.get("worker_init_fn"))
        return _Loader(self.dataset, batch_size=self.batch_size, sampler=self.sampler, drop_last=True, **kwargs)
