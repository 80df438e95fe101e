"""SIGINT/SIGTERM stop ``medgn study norms`` at once: no further arm, no table, exit 130/143.

A study arm that a signal cut short is no result: the study must not train the next arms nor
tabulate the truncated one as if it had finished. The signal is delivered to this very process,
during an arm's training step (the arm's trainer finishes the step and checkpoints) and while an
arm is being set up (the study's own handler stops it there).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from test_run_training import make_dataset

from medgn.checkpoint import read_pointer
from medgn.cli import main
from medgn.train import trainer as trainer_module
from medgn.workflows import study as study_module
from tests.tiny_config import tiny_sets

SETTINGS = tiny_sets({"train.checkpoint_every_minutes": "0"})


def _argv(data: Path, out: Path) -> list[str]:
    return ["study", "norms", "--data", str(data), "--out", str(out), "--norms", "group", "--batch-sizes", "1,2",
            "--iterations", "6", "--device", "cpu", *SETTINGS]  # fmt: skip


@pytest.fixture(autouse=True)
def _handlers_restored():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    assert {s: signal.getsignal(s) for s in before} == before  # nothing left installed


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_an_arms_step_stops_the_study(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, signum: int, code: int
) -> None:
    data = make_dataset(tmp_path / "data", n=4, size=16)
    out = tmp_path / "study"
    forward = trainer_module.Trainer._forward_loss

    def signalled(self, batch):  # the signal arrives while step 3 of the first arm computes
        if self.state.iteration == 2:
            os.kill(os.getpid(), signum)
        return forward(self, batch)

    monkeypatch.setattr(trainer_module.Trainer, "_forward_loss", signalled)
    capsys.readouterr()
    assert main(_argv(data, out)) == code
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    name = signal.Signals(signum).name
    assert len(err) == 1 and f"study stopped by {name} in arm group_b1_s0 (0 of 2 arms finished)" in err[0], err
    assert err[0].startswith("medgn: stopped: ")
    assert "norm=group seed=0 batch=2" not in captured.out  # the second arm never started
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["group_b1_s0"]
    assert not any((out / f"study.{ext}").exists() for ext in ("csv", "md", "json", "png"))
    run = out / "runs" / "group_b1_s0"
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["stop_reason"] == f"received {name}" and summary["iteration"] == 3  # the step finished
    assert read_pointer(run / "checkpoints", "latest")["iteration"] == 3  # and was checkpointed


def test_a_signal_while_an_arm_is_set_up_stops_the_study(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []

    def setting_up(cfg, data, run_dir, **kwargs):  # e.g. reading and caching the data, before training
        calls.append(Path(run_dir))
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the study's handler should have stopped the arm")

    monkeypatch.setattr(study_module, "train_on_dataset", setting_up)
    data = make_dataset(tmp_path / "data", n=4, size=16)
    out = tmp_path / "study"
    capsys.readouterr()
    assert main(_argv(data, out)) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "study stopped by SIGTERM in arm group_b1_s0 (0 of 2 arms finished)" in err[0], err
    assert [p.name for p in calls] == ["group_b1_s0"]
    assert not (out / "study.csv").exists()


def test_a_signal_after_an_arms_last_step_still_stops_the_study(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An arm whose trainer got the signal during its final validation is complete, but the study stops."""
    train = study_module.train_on_dataset
    calls: list[str] = []

    def late(cfg, data, run_dir, **kwargs):
        calls.append(Path(run_dir).name)
        result = train(cfg, data, run_dir, **kwargs)
        assert result.exit_code == 0
        result.exit_code = 130  # what Trainer.exit_code gives for a SIGINT taken after the last step
        return result

    monkeypatch.setattr(study_module, "train_on_dataset", late)
    data = make_dataset(tmp_path / "data", n=4, size=16)
    out = tmp_path / "study"
    assert main(_argv(data, out)) == 130
    assert calls == ["group_b1_s0"]
    assert not (out / "study.md").exists()


def test_trainer_exit_code_counts_a_signal_after_the_last_step() -> None:
    t = object.__new__(trainer_module.Trainer)
    t.stop_signal, t.signal_received = None, None
    assert t.exit_code == 0
    t.signal_received = signal.SIGTERM
    assert t.exit_code == 143
    t.stop_signal = signal.SIGINT
    assert t.exit_code == 130
