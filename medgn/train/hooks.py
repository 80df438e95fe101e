"""Training hooks: small objects the :class:`~medgn.train.trainer.Trainer` calls around its steps.

Detectron2-style: the trainer only steps; everything else is a hook with ``before_train``,
``after_step``, ``after_epoch`` and ``after_train`` (plus ``close`` for cleanup and
``state_dict``/``load_state_dict`` for what must survive a resume). Hooks never write checkpoints
themselves: they ask the trainer (``request_checkpoint`` / ``request_stop``), which agrees with the
other ranks under DDP and writes on rank 0. This file holds the control hooks: checkpoint cadence,
validation with an EMA of mean Dice and the best checkpoint, early stopping, time budget, and
SIGTERM/SIGINT handling. Logging hooks live in :mod:`medgn.train.logging_hooks`.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from medgn.logs import get_logger
from medgn.train.rng import preserve_rng
from medgn.train.trainer import HookBase, Trainer

log = get_logger("engine.hooks")

# validate(model) -> Dice per foreground class; the model is in eval mode, gradients are off.
Validator = Callable[[nn.Module], Sequence[float]]


class CheckpointHook(HookBase):
    """Ask for a checkpoint at every epoch end, every N minutes, every K steps, and at the end."""

    name = "checkpoint"

    def __init__(self, every_minutes: float = 10.0, every_steps: int = 0) -> None:
        self.every_s = every_minutes * 60.0
        self.every_steps = every_steps
        self._last = time.monotonic()

    def before_train(self, trainer: Trainer) -> None:
        self._last = time.monotonic()

    def after_step(self, trainer: Trainer) -> None:
        step_due = self.every_steps and trainer.state.iteration % self.every_steps == 0
        time_due = self.every_s > 0 and time.monotonic() - self._last >= self.every_s
        if step_due or time_due:
            trainer.request_checkpoint("latest")
            self._last = time.monotonic()

    def after_epoch(self, trainer: Trainer) -> None:
        trainer.request_checkpoint("latest")
        self._last = time.monotonic()

    def after_train(self, trainer: Trainer) -> None:
        trainer.request_checkpoint("latest", "final")


class ValidationHook(HookBase):
    """Validate every N epochs and at the end; track an EMA of mean Dice and the best checkpoint.

    Args:
        validate: returns Dice per class for the (unwrapped, eval-mode) model.
        every: epochs between validations (0 = only at the end).
        ema_alpha: weight of the old EMA (nnU-Net: 0.9).
    """

    name = "validation"
    main_only = True

    def __init__(self, validate: Validator, every: int = 1, ema_alpha: float = 0.9) -> None:
        self.validate = validate
        self.every = every
        self.ema_alpha = ema_alpha
        self.ema: float | None = None
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.last_iteration = -1

    def run(self, trainer: Trainer) -> dict[str, Any]:
        """Validate now; returns and records ``val_dice``, ``val_mean``, ``val_ema``, ``val_improved``."""
        model = trainer.module
        was_training = model.training
        model.eval()
        start = time.monotonic()
        try:
            with preserve_rng(), torch.no_grad():  # validation must not shift the training RNG stream
                dice = [float(d) for d in self.validate(model)]
        finally:
            model.train(was_training)
        finite = [d for d in dice if math.isfinite(d)]
        mean = sum(finite) / len(finite) if finite else 0.0
        self.ema = mean if self.ema is None else self.ema_alpha * self.ema + (1 - self.ema_alpha) * mean
        improved = self.best is None or self.ema > self.best
        if improved:
            self.best, self.best_epoch = self.ema, trainer.state.epoch
            trainer.request_checkpoint("best")
        self.last_iteration = trainer.state.iteration
        result = {"val_dice": dice, "val_mean": mean, "val_ema": self.ema, "val_improved": improved, "val_time_s": time.monotonic() - start}
        trainer.epoch_record.update(result)
        log.info("validation at epoch %d: mean Dice %.4f, EMA %.4f%s", trainer.state.epoch, mean, self.ema, " (best)" if improved else "")
        return result

    def after_epoch(self, trainer: Trainer) -> None:
        if self.every and trainer.state.epoch % self.every == 0:
            self.run(trainer)

    def after_train(self, trainer: Trainer) -> None:
        if self.last_iteration != trainer.state.iteration:
            self.run(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "best": self.best, "best_epoch": self.best_epoch, "last_iteration": self.last_iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema, self.best = state.get("ema"), state.get("best")
        self.best_epoch, self.last_iteration = state.get("best_epoch"), int(state.get("last_iteration", -1))


class EarlyStoppingHook(HookBase):
    """Stop after ``patience`` validations in a row without a new best EMA Dice."""

    name = "early_stopping"
    main_only = True

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.bad = 0

    def after_epoch(self, trainer: Trainer) -> None:
        if "val_improved" not in trainer.epoch_record or self.patience <= 0:
            return
        self.bad = 0 if trainer.epoch_record["val_improved"] else self.bad + 1
        if self.bad >= self.patience:
            trainer.request_stop(f"early stopping: no better validation EMA in {self.bad} validations")

    def state_dict(self) -> dict[str, Any]:
        return {"bad": self.bad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bad = int(state.get("bad", 0))


class TimeBudgetHook(HookBase):
    """Stop cleanly (final validation and checkpoint follow) once the wall-clock budget is spent."""

    name = "time_budget"

    def __init__(self, minutes: float) -> None:
        self.budget_s = minutes * 60.0
        self._start = time.monotonic()

    def before_train(self, trainer: Trainer) -> None:
        self._start = time.monotonic()

    def after_step(self, trainer: Trainer) -> None:
        if self.budget_s > 0 and time.monotonic() - self._start >= self.budget_s:
            trainer.request_stop(f"time budget of {self.budget_s / 60:g} min spent")


class SignalHook(HookBase):
    """On SIGTERM/SIGINT finish the current step, checkpoint and stop; a second SIGINT aborts."""

    name = "signals"

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        log.warning("received %s: finishing the current step, then checkpointing", signal.Signals(signum).name)

    def before_train(self, trainer: Trainer) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    def after_step(self, trainer: Trainer) -> None:
        if self.received is not None:
            trainer.request_stop(f"received {signal.Signals(self.received).name}", signum=self.received)

    def close(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
