"""Faults in a real training process: SIGKILL mid-epoch and inside a checkpoint save, SIGTERM.

Each run is ``tests/train/_train_driver.py`` in a subprocess (deterministic, one CPU thread).
After a kill, resuming must give final weights and optimizer state equal bit for bit to an
uninterrupted run.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medgn.checkpoint import load_checkpoint, read_pointer

DRIVER = Path(__file__).with_name("_train_driver.py")
# 2 epochs x 5 steps, checkpoints every 3 steps and at epoch ends: saves at steps 3, 5, 6, 9, 10.


def _run(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(DRIVER), "--out", str(out), *args], capture_output=True, text=True, timeout=240
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("reference")
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr
    return load_checkpoint(out / "checkpoints" / "final.json")


def _assert_same_training_state(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    opt_a, opt_b = a["optimizer"], b["optimizer"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys() and opt_a["state"]
    for index, slots in opt_a["state"].items():
        for name, value in slots.items():
            assert torch.equal(value, opt_b["state"][index][name]), (index, name)
    assert a["scheduler"] == b["scheduler"]
    for key in ("epoch", "iteration", "samples_seen"):
        assert a["counters"][key] == b["counters"][key]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_exact(tmp_path: Path, reference: dict) -> None:
    killed = _run(tmp_path, "--kill-at-step", "7")
    assert killed.returncode == -signal.SIGKILL
    latest = read_pointer(tmp_path / "checkpoints", "latest")
    assert latest["iteration"] == 6 and latest["epoch"] == 1  # one step into the second epoch
    resumed = _run(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_training_state(reference, load_checkpoint(tmp_path / "checkpoints" / "final.json"))


@pytest.mark.slow
def test_sigkill_inside_checkpoint_save_keeps_previous_and_resume_is_bit_exact(tmp_path: Path, reference: dict) -> None:
    killed = _run(tmp_path, "--kill-in-save", "3")  # the third save (step 6), between temp write and rename
    assert killed.returncode == -signal.SIGKILL
    folder = tmp_path / "checkpoints"
    assert [p for p in folder.iterdir() if p.name.startswith(".medgn-tmp-")], "the kill should leave the temporary file"
    assert read_pointer(folder, "latest")["iteration"] == 5
    assert load_checkpoint(folder)["counters"]["iteration"] == 5  # intact and hash-verified
    resumed = _run(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert not [p for p in folder.iterdir() if p.name.startswith(".medgn-tmp-")]
    _assert_same_training_state(reference, load_checkpoint(folder / "final.json"))


@pytest.mark.slow
def test_sigterm_finishes_the_step_checkpoints_and_exits_143(tmp_path: Path, reference: dict) -> None:
    stopped = _run(tmp_path, "--sigterm-at-step", "4")  # the signal arrives during step 4's forward
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert "received SIGTERM" in stopped.stdout
    assert not (tmp_path / "checkpoints" / "final.json").exists()  # not the run's end: no final checkpoint
    latest = load_checkpoint(tmp_path / "checkpoints" / "latest.json")
    assert latest["counters"]["iteration"] == 4 and latest["counters"]["stop_reason"] == "received SIGTERM"
    resumed = _run(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_training_state(reference, load_checkpoint(tmp_path / "checkpoints" / "final.json"))
