"""The encoder-freezing hook says when a run's encoder would never, or did never, train."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from torch import nn

from medgn.train.freeze import FreezeEncoderHook


def _trainer(total: int, iteration: int = 0) -> SimpleNamespace:
    module = nn.Module()
    module.encoder = nn.Linear(2, 2)
    return SimpleNamespace(module=module, state=SimpleNamespace(iteration=iteration), total_iters=total)


def _run(hook: FreezeEncoderHook, trainer: SimpleNamespace, steps: int) -> None:
    hook.before_train(trainer)
    for _ in range(steps):
        trainer.state.iteration += 1
        hook.after_step(trainer)
    hook.after_train(trainer)


def test_freezing_every_planned_step_is_said_before_training(capsys: pytest.CaptureFixture[str]) -> None:
    trainer = _trainer(total=6)
    _run(FreezeEncoderHook(100), trainer, 6)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "medgn: warning: train.freeze_encoder_steps=100 is not below the run's 6 steps: the loaded encoder will "
        "not be trained"
    ]
    assert all(p.requires_grad for p in trainer.module.encoder.parameters())  # unfrozen after the run


def test_a_schedule_that_ended_inside_the_frozen_steps_is_said_after_training(
    capsys: pytest.CaptureFixture[str],
) -> None:
    trainer = _trainer(total=250_000)  # before a time budget fits the schedule: far more steps
    hook = FreezeEncoderHook(50)
    hook.before_train(trainer)
    assert capsys.readouterr().err == ""
    trainer.total_iters = 8  # the budget fitted the schedule to 8 steps
    for _ in range(8):
        trainer.state.iteration += 1
        hook.after_step(trainer)
    hook.after_train(trainer)
    assert "the encoder stayed frozen for the whole run" in capsys.readouterr().err


@pytest.mark.parametrize(("freeze", "total", "stopped_at"), [(4, 10, 10), (0, 10, 10), (50, 100, 20)])
def test_no_warning_when_the_encoder_trains_or_the_run_was_only_interrupted(
    capsys: pytest.CaptureFixture[str], freeze: int, total: int, stopped_at: int
) -> None:
    _run(FreezeEncoderHook(freeze), _trainer(total=total), stopped_at)
    assert capsys.readouterr().err == ""
