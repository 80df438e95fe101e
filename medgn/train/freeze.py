"""Freezing the encoder for the first steps of a fine-tuning run.

:class:`FreezeEncoderHook` turns off gradients of the network's ``encoder`` parameters (except the
layers that were re-initialised, which must learn from the first step) until the run has taken
``steps`` optimiser steps, then turns them back on. Parameters without a gradient are skipped by
SGD and AdamW, so the frozen weights stay exactly as loaded. The state is a pure function of the
step counter, so a resumed run freezes or not exactly as the uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterable

from medgn.logs import get_logger, warn_user
from medgn.train.trainer import HookBase, Trainer

log = get_logger(__name__)


class FreezeEncoderHook(HookBase):
    """Keep ``module.encoder`` frozen for the first ``steps`` optimiser steps.

    Args:
        steps: steps to keep the encoder frozen (0: never).
        trainable: state-dict names that stay trainable (re-initialised layers).
    """

    name = "freeze_encoder"

    def __init__(self, steps: int, trainable: Iterable[str] = ()) -> None:
        self.steps = int(steps)
        self.trainable = set(trainable)
        self.frozen = False
        self.warned = False

    def _set(self, trainer: Trainer, frozen: bool) -> None:
        encoder = getattr(trainer.module, "encoder", None)
        if encoder is None:
            return
        for name, param in encoder.named_parameters():
            if f"encoder.{name}" not in self.trainable:
                param.requires_grad_(not frozen)
        self.frozen = frozen

    def before_train(self, trainer: Trainer) -> None:
        if trainer.state.iteration < self.steps and self.steps >= trainer.total_iters:
            self.warned = True
            warn_user(
                f"train.freeze_encoder_steps={self.steps} is not below the run's {trainer.total_iters} steps: "
                "the loaded encoder will not be trained",
                log,
            )
        if trainer.state.iteration < self.steps:
            self._set(trainer, True)
            log.info("encoder frozen until step %d (now at step %d)", self.steps, trainer.state.iteration)

    def after_step(self, trainer: Trainer) -> None:
        if self.frozen and trainer.state.iteration >= self.steps:
            self._set(trainer, False)
            log.info("encoder unfrozen at step %d", trainer.state.iteration)

    def after_train(self, trainer: Trainer) -> None:
        if self.frozen:
            self._set(trainer, False)
        done = trainer.state.iteration >= trainer.total_iters  # not a run stopped early, to be resumed
        if self.steps and done and trainer.state.iteration <= self.steps and not self.warned:
            warn_user(
                f"the encoder stayed frozen for the whole run: train.freeze_encoder_steps={self.steps}, "
                f"and the run stopped at step {trainer.state.iteration}",
                log,
            )
