"""What the trainer records and its hooks read: the run's counters and a step's result.

:class:`TrainState` holds the JSON-able counters saved in every checkpoint; :class:`StepResult` what
one optimiser step did; :class:`NonFiniteLossError` is the stop after too many non-finite steps in a
row. :class:`~medgn.train.trainer.Trainer` fills them; hooks (:class:`~medgn.train.trainer.HookBase`)
read them.
"""

from __future__ import annotations

import dataclasses

from medgn.errors import ResourceError

__all__ = ["NonFiniteLossError", "StepResult", "TrainState"]


class NonFiniteLossError(ResourceError):
    """Too many steps in a row had a non-finite loss or gradient (exit code 5)."""


@dataclasses.dataclass
class TrainState:
    """Counters of a run; JSON-able, saved in every checkpoint."""

    epoch: int = 0  # completed epochs = index of the current epoch
    epoch_iter: int = 0  # steps done in the current epoch
    iteration: int = 0  # steps done in the whole run
    samples_seen: int = 0  # over all ranks
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    epoch_time_s: float = 0.0
    stop_reason: str = ""
    planned_iters: int = 0  # the schedule's length when a time budget fixed it; 0 = epochs x iters
    # Where the schedule's length last changed, and the decay's progress there (optim.schedule_progress).
    schedule_anchor_iter: int = 0
    schedule_anchor_progress: float = 0.0


@dataclasses.dataclass
class StepResult:
    """What one :meth:`Trainer.train_step` did."""

    loss: float | None
    lr: float
    grad_norm: float | None
    skipped: bool
    case_ids: list[str]
    seconds: float
