"""The training configuration: one frozen dataclass, validated by :mod:`medgn.configtools`.

:class:`TrainConfig` holds every knob of the trainer (optimiser, schedule, epochs of a fixed number
of iterations, batch size, accumulation, clipping, mixed precision, deep supervision, validation
cadence, the EMA of validation Dice, checkpoint cadence, early stopping, non-finite loss limit, time
budget, seed and determinism). It is built with ``configtools.build(TrainConfig, mapping, "train")``
so unknown keys, wrong types and out-of-range values fail naming the key. Defaults follow nnU-Net
v2 where it has one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from medgn.errors import UsageError

# Bounds of step counts (warmup, checkpoint and log cadence, freezing): the most steps a run can
# have, 100,000 epochs of 100,000 iterations, would take centuries; 10 million is weeks of fast steps.
MAX_STEPS = 10_000_000
# A year in minutes: the longest time budget or checkpoint interval. "Never" is spelled 0.
MAX_MINUTES = 525_600.0
# The sampler lists an epoch's case indices in memory (8 bytes each) before its first step: a
# million samples is 8 MB and well under a second; nnU-Net's epoch is 500.
MAX_SAMPLES_PER_EPOCH = 1_000_000


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (section ``train`` of a run config).

    An epoch is ``iters_per_epoch`` optimiser steps; each step sees ``grad_accum`` micro-batches of
    ``batch_size`` samples per process.
    """

    optimizer: Literal["sgd", "adamw"] = "sgd"
    # nnU-Net v2: SGD lr 1e-2, Nesterov momentum 0.99, weight decay 3e-5.
    lr: float = field(default=1e-2, metadata={"min": 0.0, "max": 10.0})
    momentum: float = field(default=0.99, metadata={"min": 0.0, "max": 1.0})
    weight_decay: float = field(default=3e-5, metadata={"min": 0.0, "max": 1.0})
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    # nnU-Net's PolyLRScheduler exponent.
    poly_exponent: float = field(default=0.9, metadata={"min": 0.0, "max": 10.0})
    warmup_iters: int = field(default=0, metadata={"min": 0, "max": MAX_STEPS})
    # nnU-Net trains 1000 epochs of 250 iterations. The upper bounds are 100x nnU-Net's (epochs,
    # iterations) or far beyond any 3D batch that fits a GPU: a larger value is a typo, and an
    # epoch's sample order is a list in memory (see MAX_SAMPLES_PER_EPOCH).
    epochs: int = field(default=1000, metadata={"min": 1, "max": 100_000})
    iters_per_epoch: int = field(default=250, metadata={"min": 1, "max": 100_000})
    batch_size: int = field(default=2, metadata={"min": 1, "max": 1024})
    grad_accum: int = field(default=1, metadata={"min": 1, "max": 1024})
    # nnU-Net clips the gradient norm at 12; 0 disables clipping.
    clip_grad: float = field(default=12.0, metadata={"min": 0.0, "hint": "0 = no clipping"})
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    deep_supervision: bool = True
    # Like nnU-Net: the lowest-resolution head gets weight 0 after halving.
    ds_drop_lowest: bool = True
    # 0..1000: the loss terms are O(1); a larger weight only rescales the learning rate.
    dice_weight: float = field(default=1.0, metadata={"min": 0.0, "max": 1000.0})
    ce_weight: float = field(default=1.0, metadata={"min": 0.0, "max": 1000.0})
    batch_dice: bool = False
    dice_include_background: bool = False
    # Validation every N epochs (and once at the end); 0 = only at the end.
    val_every: int = field(default=1, metadata={"min": 0, "max": 100_000, "hint": "0 = only at the end"})
    # Smoothing of the validation Dice that selects the best checkpoint: ema = a * ema + (1 - a) * new.
    # 0 selects by the raw Dice: nnU-Net's 0.9 trails the latest validations by several points
    # when validations are few (a CPU budget gives 5-10), so the "best" lags the model.
    ema_alpha: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    # A crash should lose minutes, not hours: checkpoint every 10 minutes and at every epoch end.
    # 0 = only at epoch ends; at most a year (MAX_MINUTES).
    checkpoint_every_minutes: float = field(
        default=10.0, metadata={"min": 0.0, "max": MAX_MINUTES, "hint": "0 = only at epoch ends"}
    )
    # Extra step-based checkpoints (0 = off); used for fine-grained exact-resume tests.
    checkpoint_every_steps: int = field(default=0, metadata={"min": 0, "max": MAX_STEPS, "hint": "0 = off"})
    # Number of step checkpoints kept on disk besides the best and final ones (1000 fill any disk).
    keep_checkpoints: int = field(default=2, metadata={"min": 1, "max": 1000})
    # Validations without EMA improvement before stopping; 0 = never stop early.
    early_stopping_patience: int = field(default=0, metadata={"min": 0, "max": 100_000, "hint": "0 = never"})
    # Skipped steps in a row (non-finite loss or gradient) that end the run.
    max_nonfinite_in_row: int = field(default=10, metadata={"min": 1, "max": MAX_STEPS})
    # Wall-clock budget of this process in minutes; 0 = no budget, at most a year (MAX_MINUTES).
    time_budget_minutes: float = field(default=0.0, metadata={"min": 0.0, "max": MAX_MINUTES, "hint": "0 = no budget"})
    # With a budget, fit the schedule's length to it (measured step rate) instead of epochs x iters:
    # the LR anneals to its end exactly when the budget is spent. False keeps epochs x iters.
    fit_schedule_to_budget: bool = True
    # Steps timed before the schedule's length is fixed (after the first 3, which include start-up):
    # 20 steps give the rate within a few percent on a quiet machine.
    # At most 10,000: the probe must end well inside any budget.
    budget_probe_steps: int = field(default=20, metadata={"min": 1, "max": 10_000})
    # Steps between logged metric records (metrics.jsonl, TensorBoard).
    log_every: int = field(default=10, metadata={"min": 1, "max": MAX_STEPS})
    seed: int = field(default=0, metadata={"min": 0, "max": 2**31 - 1})
    deterministic: bool = False
    # Fine-tuning (--init-from): optimiser steps during which the loaded encoder stays frozen.
    freeze_encoder_steps: int = field(default=0, metadata={"min": 0, "max": MAX_STEPS})
    # Before the run folder is written, refuse (exit 5) a run whose estimated memory clearly exceeds
    # what the machine has (medgn.train.memory); false trains anyway (swap, unified memory).
    memory_check: bool = True

    def __post_init__(self) -> None:
        # UsageError (not ValueError, which configtools.build turns into one): a config made with
        # dataclasses.replace, as the norm study makes its arms, is refused as a usage error too.
        samples = self.iters_per_epoch * self.grad_accum * self.batch_size
        if samples > MAX_SAMPLES_PER_EPOCH:
            raise UsageError(
                "train",
                f"iters_per_epoch * grad_accum * batch_size = {self.iters_per_epoch} * {self.grad_accum} * "
                f"{self.batch_size} = {samples} samples per epoch",
                expected=f"at most {MAX_SAMPLES_PER_EPOCH:,}: fewer iterations per epoch and more epochs",
            )
        if self.dice_weight == 0 and self.ce_weight == 0:
            raise UsageError(
                "train", "dice_weight and ce_weight are both 0: the loss would train nothing", expected="one above 0"
            )
        if self.warmup_iters >= self.epochs * self.iters_per_epoch:
            raise UsageError(
                "train",
                f"warmup_iters={self.warmup_iters} must be smaller than epochs * iters_per_epoch "
                f"= {self.epochs * self.iters_per_epoch}",
            )

    @property
    def total_iters(self) -> int:
        """Optimiser steps of the whole run."""
        return self.epochs * self.iters_per_epoch

    @property
    def micro_batches_per_epoch(self) -> int:
        """Micro-batches each process draws per epoch."""
        return self.iters_per_epoch * self.grad_accum
