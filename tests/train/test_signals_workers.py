"""Stop signals sent to a whole process group while DataLoader worker processes run.

``timeout``, systemd, SLURM's scancel, ``kill -- -PGID`` and a terminal's Ctrl-C signal every process
of the group, the data workers included. The main process alone must decide: it finishes the step,
writes a checkpoint (``latest``, without a validation) and ``train_summary.json``, and exits 143
(SIGTERM) or 130 (SIGINT);
a worker killed by the same signal must not turn that into "DataLoader worker ... is killed by
signal" (exit 1). The unit tests check the worker set-up itself on a real two-worker DataLoader.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from medgn.checkpoint import read_pointer
from medgn.train.sampler import ResumableLoader, ResumableSampler, WorkerInit, stop_signals_blocked
from tests.reliability.conftest import child_env, make_msd, medgn_cmd
from tests.tiny_config import tiny_sets

TRAIN = [
    *tiny_sets(
        {
            "data.num_workers": "2",  # the default: two worker processes in the signalled group
            "train.val_every": "0",
            "train.log_every": "1",
            "train.checkpoint_every_minutes": "0",
            "train.epochs": "10000",  # never ends by itself: only the signal stops it
            "train.iters_per_epoch": "2",  # new workers every 2 steps: signals also land while workers start
        }
    ),
    "--no-progress",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def train_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_msd(tmp_path_factory.mktemp("sigdata") / "ds", 4, shape=(20, 20, 20))


def _steps(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    if not metrics.exists():
        return 0
    return sum('"kind": "step"' in line for line in metrics.read_text().splitlines())


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_to_the_process_group_checkpoints_and_exits(
    train_data: Path, tmp_path: Path, signum: int, code: int
) -> None:
    run = tmp_path / "run"
    argv = ["train", "--data", train_data, "--out", run, *TRAIN]
    # Own session and group, as under a shell, systemd or SLURM; the signal goes to the whole group.
    proc = subprocess.Popen(
        medgn_cmd(argv), env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180  # set-up (verify, plan, cache) takes a few seconds
        while _steps(run) < 6 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1]
        assert _steps(run) >= 6, "training did not start"
        os.killpg(proc.pid, signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == code, err
    assert "internal error" not in err and "Traceback" not in err, err
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["stop_reason"] == f"received {signal.Signals(signum).name}"
    latest = read_pointer(run / "checkpoints", "latest")
    assert latest is not None and latest["iteration"] == summary["iteration"] >= 6
    assert read_pointer(run / "checkpoints", "final") is None  # not the run's end
    assert not (run / "postprocessing.json").exists()  # decided at the real end, after --resume


class _Pids(Dataset):
    """Each item is the worker's pid and the signal mask it runs with, after the worker's set-up."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, set())
        return torch.tensor(
            [os.getpid(), int(signal.SIGTERM in blocked), int(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)]
        )


def _record_worker(path: str, worker_id: int) -> None:
    Path(path, f"w{worker_id}").write_text(str(os.getpid()))


def test_workers_ignore_stop_signals_from_others_and_run_the_callers_init(tmp_path: Path) -> None:
    import functools

    sampler = ResumableSampler(8, 8, seed=0)
    init = functools.partial(_record_worker, str(tmp_path))
    loader = ResumableLoader(_Pids(), sampler, 2, num_workers=2, worker_init_fn=init)
    it = iter(loader(0, 0))
    first = next(it)  # (2, 3): pid, SIGTERM blocked, SIGINT ignored
    pids = {int(p) for p in first[:, 0]}
    assert first[:, 1].tolist() == [1, 1] and first[:, 2].tolist() == [1, 1]
    deadline = time.monotonic() + 30  # the second worker may still be starting
    while len(list(tmp_path.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w0", "w1"]  # the caller's worker_init_fn ran
    workers = {int(p.read_text()) for p in tmp_path.iterdir()}
    assert pids <= workers
    # What a signal to the whole process group does to the workers: sent by another process (a worker
    # exits on its parent's SIGTERM, the DataLoader's own shutdown).
    kill = "import os, sys; [os.kill(int(p), s) for p in sys.argv[1:] for s in (15, 2)]"
    subprocess.run([sys.executable, "-c", kill, *map(str, workers)], check=True, timeout=60)
    time.sleep(0.5)
    for pid in workers:
        os.kill(pid, 0)  # still alive (raises ProcessLookupError otherwise)
    rest = list(it)  # the epoch completes with the same workers
    assert len(rest) == 3
    del it, rest
    time.sleep(0.2)


def test_parents_sigterm_still_ends_a_worker(tmp_path: Path) -> None:
    """The DataLoader's own shutdown (``terminate()``, a SIGTERM from the parent) still ends a worker."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    with stop_signals_blocked():
        proc = ctx.Process(target=_init_then_sleep, daemon=True)
        proc.start()
    time.sleep(0.5)  # WorkerInit has run
    proc.terminate()
    proc.join(timeout=10)
    assert proc.exitcode == 0


def _init_then_sleep() -> None:
    WorkerInit()(0)
    time.sleep(30)


def test_stop_signals_blocked_delivers_a_pending_signal_on_exit() -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with stop_signals_blocked():
            # To this thread, which blocks it: a signal sent to the process would go to another thread
            # that does not (pytest-xdist runs one), and Python would run the handler at once.
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
            assert seen == []
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_worker_dying_of_the_stop_signal_is_taken_for_the_stop(tmp_path: Path) -> None:
    """Where a worker can still die of the group's signal (a start method without the inherited mask)."""
    from test_trainer import _cfg, _trainer

    from medgn.train.hooks import SignalHook
    from medgn.train.logging_hooks import default_hooks

    cfg = _cfg(epochs=4, iters_per_epoch=5)
    hooks = default_hooks(cfg, tmp_path, console=False)
    assert any(isinstance(h, SignalHook) for h in hooks)
    trainer = _trainer(cfg, tmp_path, hooks)
    source = trainer.source

    def dying(epoch: int, start: int):
        for i, batch in enumerate(source(epoch, start)):
            if epoch == 1 and i == 2:  # the signal reaches this process and kills the worker
                os.kill(os.getpid(), signal.SIGTERM)
                raise RuntimeError("DataLoader worker (pid 12345) is killed by signal: Terminated.")
            yield batch

    trainer.source = dying
    state = trainer.train()
    assert state.stop_reason == "received SIGTERM" and state.iteration == 7 and trainer.exit_code == 143
    assert read_pointer(tmp_path / "checkpoints", "latest")["iteration"] == 7

    trainer = _trainer(cfg, None, [])  # without a signal the same error is an error

    def broken(epoch: int, start: int):
        raise RuntimeError("DataLoader worker (pid 12345) is killed by signal: Killed.")
        yield

    trainer.source = broken
    with pytest.raises(RuntimeError, match="Killed"):
        trainer.train()
