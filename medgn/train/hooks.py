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
from medgn.train import distributed as ddp
from medgn.train.config import TrainConfig
from medgn.train.rng import preserve_rng
from medgn.train.trainer import HookBase, Trainer

log = get_logger(__name__)

# validate(model) -> Dice per foreground class; the model is in eval mode, gradients are off.
Validator = Callable[[nn.Module], Sequence[float]]


class CheckpointHook(HookBase):
    """Ask for a checkpoint at every epoch end, every N minutes, every K steps, and at the end (``final``;
    a run stopped by a signal gets ``latest`` only)."""

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
        # Stopped by a signal, the run is not at its end: a resumable checkpoint, written at once.
        trainer.request_checkpoint(*(("latest",) if trainer.stop_signal is not None else ("latest", "final")))


class ValidationHook(HookBase):
    """Validate every N epochs and at the end (not after a stop signal); track an EMA of mean Dice and
    the best checkpoint.

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
        result = {
            "val_dice": dice,
            "val_mean": mean,
            "val_ema": self.ema,
            "val_improved": improved,
            "val_time_s": time.monotonic() - start,
        }
        trainer.epoch_record.update(result)
        log.info(
            "validation at epoch %d: mean Dice %.4f, EMA %.4f%s",
            trainer.state.epoch,
            mean,
            self.ema,
            " (best)" if improved else "",
        )
        return result

    def after_epoch(self, trainer: Trainer) -> None:
        if self.every and trainer.state.epoch % self.every == 0:
            self.run(trainer)

    def after_train(self, trainer: Trainer) -> None:
        # Not after a stop signal: the run is not at its end (its resume validates there), and the
        # sender waits (``docker stop`` kills after 10 s).
        if self.last_iteration != trainer.state.iteration and trainer.stop_signal is None:
            self.run(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {
            "ema": self.ema,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "last_iteration": self.last_iteration,
        }

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
    """Stop cleanly once the wall-clock budget is spent, and fit the schedule's length to the budget.

    With ``cfg.fit_schedule_to_budget`` the hook times ``cfg.budget_probe_steps`` steps (after the
    first :attr:`SKIP_STEPS`, which include start-up work; fewer when that many would take more than
    :attr:`PROBE_FRACTION` of the budget, judged from the first two), then fixes the run's total step count so
    that the learning-rate schedule ends when the budget does:

        steps left = (budget - elapsed - reserve) / (s + v / (val_every * iters_per_epoch))

    with ``s`` the measured seconds per step and ``v`` the seconds of one validation. ``v`` is
    unknown until the first validation: the total is fixed again, once, right after it, with ``s``
    measured over every step since the probe. A run without validation (``--fold all``) fixes it
    again once :attr:`REFINE_FRACTION` of the planned steps have run, from the rate over all of them
    (the first steps run slower or faster than the steady state: caches filling, the allocator
    growing, checkpoint writes). After that the total is refitted again halfway through what is
    left, and again halfway through the rest, for as long as half of what is left is at least
    ``budget_probe_steps`` steps. Each refit uses the rate of the steps since the previous one
    (wall-clock, validations taken out and counted at their own measured cost), so a run whose
    speed drifts (thermal limits, a busy machine, a slow start that the first estimate still
    averaged in) ends within a few steps of the budget instead of minutes short of it. The reserve
    is :attr:`RESERVE_FRACTION` of the budget plus one validation (the final one). The total goes
    into the trainer's counters with the step where it last changed, from which the decay
    continues (no jump in the learning rate), so checkpoints carry it and a resumed run follows
    the same schedule bit for bit; a resumed run does not refit. Under DDP every rank takes rank
    0's total.
    """

    name = "time_budget"
    # Steps 1-3 include lazy initialisation (oneDNN primitives, allocator growth): not timed.
    SKIP_STEPS = 3
    # A probe is shortened to about this fraction of the budget (at least 2 steps), from the rate of
    # its first 2 steps: in a budget of a few slow steps, a full probe would end after the budget
    # and the schedule would never anneal.
    PROBE_FRACTION = 0.1
    # Checkpoint writes and epoch-end bookkeeping outside the timed steps: ~1 % measured on the CPU
    # recipe; 2 % leaves room for a slower second half without overrunning the budget.
    RESERVE_FRACTION = 0.02
    # Without validation, the total is fixed again after this fraction of the first plan's remaining
    # steps: late enough for a steady rate, early enough that the schedule barely changes shape.
    REFINE_FRACTION = 0.25

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        started_at: float | None = None,
        validates: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.budget_s = cfg.time_budget_minutes * 60.0
        self.fit = cfg.fit_schedule_to_budget
        self.probe_steps = cfg.budget_probe_steps
        self.refit_min_steps = cfg.budget_probe_steps  # the shortest refit window (a short probe keeps it)
        self.steps_per_validation = cfg.val_every * cfg.iters_per_epoch if validates and cfg.val_every else 0
        self.validates = validates
        self.first_val_epoch = cfg.val_every if validates and cfg.val_every else 0
        self._start = started_at
        self._probe: tuple[float, int] | None = None  # (time, iteration) where the probe began
        self.step_s: float | None = None
        self.val_s = 0.0
        self._refine_at = 0
        self.phase = 0  # 0: not planned, 1: planned from the step rate, 2: re-planned (then refits)
        # Late refits: the window of steps since the last plan (start time, iteration, seconds of
        # validation inside it) and the iteration of the next refit (0: none left).
        self._win: tuple[float, int] | None = None
        self._win_val_s = 0.0
        self._win_vals = 0
        self._next_refit = 0
        self.refits = 0

    def before_train(self, trainer: Trainer) -> None:
        if self._start is None:
            self._start = self.clock()

    def _elapsed(self) -> float:
        now = self.clock()
        return now - (self._start if self._start is not None else now)

    def _plan(self, trainer: Trainer, reason: str) -> int:
        assert self.step_s is not None
        per_step = self.step_s + (self.val_s / self.steps_per_validation if self.steps_per_validation else 0.0)
        left_s = self.budget_s * (1.0 - self.RESERVE_FRACTION) - self._elapsed() - self.val_s
        it = trainer.state.iteration
        total = it + max(1, int(left_s / max(per_step, 1e-9)))
        total = int(ddp.gather_objects(total)[0])  # every rank follows rank 0's schedule
        trainer.plan_total_iters(
            total, f"{reason}: {self.step_s:.3f} s/step, {self.val_s:.1f} s/validation, {left_s / 60:.1f} min left"
        )
        # The next late refit: halfway through what is left, while that half is a probe's worth of
        # steps (the same iteration on every rank: it depends on the shared total only).
        half = (trainer.total_iters - it) // 2
        self._next_refit = it + half if self.phase == 2 and half >= self.refit_min_steps else 0
        self._win, self._win_val_s, self._win_vals = (self.clock(), it), 0.0, 0
        return total

    @staticmethod
    def _rate(origin: tuple[float, int] | None, now: float, iteration: int, excluded_s: float = 0.0) -> float | None:
        """Seconds per step since ``origin`` = (time, iteration), ``excluded_s`` taken out.

        None without an origin (after a resume: not timed) or without a step since it.
        """
        if origin is None or iteration <= origin[1]:
            return None
        return max(now - origin[0] - excluded_s, 1e-9) / (iteration - origin[1])

    def after_step(self, trainer: Trainer) -> None:
        it = trainer.state.iteration
        if self.fit and self.phase == 0 and not trainer.state.planned_iters:
            if it == self.SKIP_STEPS:
                self._probe = (self.clock(), it)
            elif self._probe is not None and it == self._probe[1] + 2 and self.probe_steps > 2 and self.budget_s > 0:
                # Two steps timed (the same step on every rank): shorten the probe to what the budget affords.
                rate = self._rate(self._probe, self.clock(), it) or 1e-9
                affordable = max(2, int(self.PROBE_FRACTION * self.budget_s / rate))
                self.probe_steps = int(ddp.gather_objects(min(self.probe_steps, affordable))[0])
            if self._probe is not None and it >= self._probe[1] + self.probe_steps:
                self.step_s = self._rate(self._probe, self.clock(), it)
                self.phase = 1
                total = self._plan(trainer, f"time budget {_duration(self.budget_s)}")
                self._refine_at = it + max(self.probe_steps, int((total - it) * self.REFINE_FRACTION))
        elif self.fit and self.phase == 1 and not self.steps_per_validation and it >= self._refine_at > 0:
            rate = self._rate(self._probe, self.clock(), it)
            self.phase = 2
            if rate is not None:  # a probe origin exists
                self.step_s = rate
                self._plan(trainer, f"step rate over {it - self._probe[1]} steps")  # type: ignore[index]
        elif self.fit and self.phase == 2 and it >= self._next_refit > 0 and self._win is not None:
            self.step_s = self._rate(self._win, self.clock(), it, self._win_val_s)
            if self._win_vals:
                self.val_s = self._win_val_s / self._win_vals
            self.refits += 1
            self._plan(trainer, f"refit {self.refits}, step rate over the last {it - self._win[1]} steps")
        if self.budget_s > 0 and self._elapsed() >= self.budget_s:
            if self.fit and self.phase == 0 and not trainer.state.planned_iters:
                log.warning(
                    "the time budget of %s was spent before the step rate was measured (%d steps): the "
                    "learning rate did not anneal; give a longer budget",
                    _duration(self.budget_s),
                    it,
                )
            trainer.request_stop(f"time budget of {_duration(self.budget_s)} spent")

    def after_epoch(self, trainer: Trainer) -> None:
        if self.fit and self.phase == 2 and self._win is not None:
            measured = trainer.epoch_record.get("val_time_s")
            if measured is not None:  # out of the refit window's step time, into the validation cost
                self._win_val_s += float(measured)
                self._win_vals += 1
        # The same epoch on every rank (a config rule), so every rank joins the gather.
        if not self.fit or not self.first_val_epoch or trainer.state.epoch != self.first_val_epoch or self.phase == 2:
            return
        measured = trainer.epoch_record.get("val_time_s")  # only rank 0 validates
        self.val_s = float(ddp.gather_objects(float(measured) if measured is not None else 0.0)[0])
        if self.phase == 1:  # planned before the first validation: plan again with its time
            self.phase = 2
            rate = self._rate(self._probe, self.clock(), trainer.state.iteration, excluded_s=self.val_s)
            if rate is not None:
                self.step_s = rate
            self._plan(trainer, "first validation measured")

    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "step_s": self.step_s, "val_s": self.val_s}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.phase = int(state.get("phase", 0))
        self.step_s = state.get("step_s")
        self.val_s = float(state.get("val_s", 0.0))


class SignalHook(HookBase):
    """On SIGTERM/SIGINT finish the current step, checkpoint and stop; a second SIGINT aborts.

    The trainer learns of the signal at once (``trainer.signal_received``), so a data worker that
    dies of the same signal is taken for the stop, not for a failure.
    """

    name = "signals"

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._trainer: Trainer | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        if self._trainer is not None:
            self._trainer.signal_received = signum
        log.warning("received %s: finishing the current step, then checkpointing", signal.Signals(signum).name)

    def before_train(self, trainer: Trainer) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        self._trainer = trainer
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    def after_step(self, trainer: Trainer) -> None:
        if self.received is not None:
            trainer.request_stop(f"received {signal.Signals(self.received).name}", signum=self.received)

    def close(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        self._trainer = None


def _duration(seconds: float) -> str:
    """A budget as people write it: ``20 min``, ``1.5 min``, ``10 s``."""
    return f"{seconds / 60:.4g} min" if seconds >= 60 else f"{seconds:.3g} s"
