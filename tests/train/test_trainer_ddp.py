"""Two-process DDP on the CPU (gloo) through torchrun: trains, rank 0 checkpoints, exact resume."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_trainer_resume import DRIVER, _assert_same_training_state

from medgn.checkpoint import load_checkpoint, read_pointer


def _kill_workers(out: Path) -> None:
    """SIGKILL every process whose command line names the run folder ``out``."""
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            cmdline = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(out) in cmdline:
            with contextlib.suppress(OSError):
                os.kill(int(proc_dir.name), signal.SIGKILL)


def _torchrun(out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(DRIVER),
        "--out",
        str(out),
        *args,
    ]
    # Own session: on a timeout the whole group (torchrun and both workers) is killed, so no
    # orphaned worker keeps a core busy. 300 s: a normal run takes ~15 s on an idle 2-core machine.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _kill_workers(out)  # torchrun starts its workers in their own process groups
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun {' '.join(args) or '(reference)'} hung: {stderr[-3000:]!r}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_two_process_gloo_run_trains_checkpoints_and_resumes_exactly(tmp_path: Path) -> None:
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = _torchrun(ref_dir)
    assert ref.returncode == 0, ref.stderr[-2000:]
    final = load_checkpoint(ref_dir / "checkpoints" / "final.json")
    assert final["sampler"]["world_size"] == 2
    assert final["counters"]["samples_seen"] == 2 * 10 * 2  # ranks x steps x batch
    assert len(final["rng"]) == 2 and not torch.equal(final["rng"][0]["torch"], final["rng"][1]["torch"])
    records = [line for line in (ref_dir / "metrics.jsonl").read_text().splitlines() if '"kind": "epoch"' in line]
    assert len(records) == 2  # rank 0 alone writes the logs
    for path in (ref_dir / "checkpoints").glob("*.pt"):
        torch.load(path, weights_only=True)

    killed = _torchrun(run_dir, "--kill-at-step", "7")
    assert killed.returncode != 0
    assert read_pointer(run_dir / "checkpoints", "latest")["iteration"] == 6
    resumed = _torchrun(run_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_training_state(final, load_checkpoint(run_dir / "checkpoints" / "final.json"))
