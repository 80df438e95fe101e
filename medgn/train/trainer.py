"""The trainer: one optimiser step at a time, everything else in hooks.

:class:`Trainer` owns the model (wrapped in DDP under torchrun), optimiser, LR schedule, gradient
scaler and counters. :meth:`Trainer.train_step` runs one step (gradient accumulation, autocast,
clipping, non-finite skip); :meth:`Trainer.train` loops over iteration-based epochs of a batch
source ``source(epoch, start_micro_batch)`` whose order is a pure function of (seed, epoch,
position), calling hooks between steps. :meth:`Trainer.state_dict` is the whole resumable state
(tensors and JSON-able values), so :meth:`Trainer.resume` continues bit for bit on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medgn.checkpoint import load_checkpoint, save_checkpoint
from medgn.configtools import config_hash, to_dict
from medgn.environment import versions
from medgn.errors import InputDataError, ModelError
from medgn.logs import get_logger, warn_user
from medgn.train import distributed as ddp
from medgn.train.config import TrainConfig
from medgn.train.losses import default_loss
from medgn.train.optim import build_optimizer, build_scheduler, check_optimizer_groups, resolve_amp, schedule_progress
from medgn.train.rng import capture_rng, restore_rng, seed_everything
from medgn.train.sampler import BatchSource
from medgn.train.state import NonFiniteLossError, StepResult, TrainState

__all__ = ["HookBase", "Trainer"]

log = get_logger(__name__)


class HookBase:
    """A hook does nothing until a method is overridden. ``main_only`` hooks run on rank 0 only."""

    name: str = "hook"
    main_only: bool = False

    def before_train(self, trainer: Trainer) -> None:
        """Called once before the first step (after a resume has restored state)."""

    def after_step(self, trainer: Trainer) -> None:
        """Called after every optimiser step; ``trainer.last_step`` holds its result."""

    def after_epoch(self, trainer: Trainer) -> None:
        """Called after the last step of an epoch; ``trainer.epoch_record`` may be extended."""

    def after_train(self, trainer: Trainer) -> None:
        """Called once when training ends normally (epochs done, stop requested, budget spent)."""

    def close(self) -> None:
        """Release resources (files, signal handlers); called even when training fails."""

    def state_dict(self) -> dict[str, Any]:
        """What this hook must carry across a resume (tensors and JSON-able values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""


class Trainer:
    """Train ``model`` on batches from ``source`` under ``cfg``.

    Args:
        model: the network (unwrapped); moved to ``device`` and wrapped in DDP when distributed.
        cfg: the training configuration.
        source: ``source(epoch, start)`` yields micro-batches ``{"image", "label", "case_id"}`` of
            that epoch from micro-batch ``start`` on (see :class:`~medgn.train.sampler.ResumableLoader`).
        out_dir: run folder (checkpoints go to ``out_dir/checkpoints``); None writes nothing.
        device: torch device.
        hooks: hooks in the order they run.
        loss_fn: ``loss(outputs, label)``; defaults to :func:`default_loss`.
        run_config: the resolved run config (all sections, JSON-able) saved as ``config`` in
            checkpoints; its ``train`` section is replaced by ``cfg``. Inference rebuilds the
            network from its ``model`` section and the ``plan``.
        plan: the dataset plan (JSON-able), saved as ``plan`` in checkpoints.
        dist_info: rank layout; read from the environment when None.
        run_record: what a resume must match besides the config (the fold, the dataset's files),
            JSON-able, saved as ``run`` in checkpoints.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        source: BatchSource,
        *,
        out_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        hooks: Sequence[HookBase] = (),
        loss_fn: nn.Module | None = None,
        run_config: Mapping[str, Any] | None = None,
        plan: Mapping[str, Any] | None = None,
        dist_info: ddp.DistInfo | None = None,
        run_record: Mapping[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.dist = dist_info or ddp.init_distributed(self.device.type)
        seed_everything(cfg.seed + self.dist.rank, deterministic=cfg.deterministic)
        self.module = model.to(self.device)
        self.model: nn.Module = self.module
        if self.dist.enabled:
            ids = [self.device.index or 0] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.module, device_ids=ids)
        self.source = source
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.hooks = [h for h in hooks if self.dist.is_main or not h.main_only]
        self.loss_fn = loss_fn if loss_fn is not None else default_loss(cfg)
        self.amp_dtype, use_scaler = resolve_amp(cfg.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if use_scaler else None
        self.state = TrainState()  # before the scheduler: its length reads state.planned_iters
        self.optimizer = build_optimizer(self.module.parameters(), cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, lambda: self.total_iters, lambda: self._anchor)
        self.run_config = {**dict(run_config or {}), "train": to_dict(cfg)}
        self.plan = dict(plan or {})
        self.run_record = dict(run_record or {})
        self.epoch_records: list[dict[str, Any]] = []
        self.epoch_record: dict[str, Any] = {}
        self.last_step: StepResult | None = None
        self.stop_signal: int | None = None
        self.signal_received: int | None = None  # set by SignalHook's handler the moment a signal arrives
        self.recent_bad_cases: list[str] = []
        self._pending: set[str] = set()

    # ---- requests from hooks -------------------------------------------------------------
    def request_stop(self, reason: str, *, signum: int | None = None) -> None:
        """Stop after the current step (the final validation and checkpoint still run)."""
        if not self.state.stop_reason:
            self.state.stop_reason = reason
            self.stop_signal = signum

    def request_checkpoint(self, *pointers: str) -> None:
        """Write a checkpoint after the current step and point ``pointers`` (latest/best/final) at it."""
        self._pending.update(pointers)

    @property
    def total_iters(self) -> int:
        """Optimiser steps of the whole run: fixed by a time budget, else epochs x iters_per_epoch."""
        return self.state.planned_iters or self.cfg.total_iters

    @property
    def _anchor(self) -> tuple[int, float]:
        return self.state.schedule_anchor_iter, self.state.schedule_anchor_progress

    def plan_total_iters(self, total: int, reason: str) -> None:
        """Fix the schedule's length at ``total`` steps (at least one more than done so far).

        The decay continues from where it is now (an anchor at this step), so the learning rate
        does not jump when a time budget refits the length mid-run.
        """
        total = max(int(total), self.state.iteration + 1)
        if total != self.total_iters:
            log.info("schedule set to %d steps (%s)", total, reason)
            it = self.state.iteration  # an anchor inside warmup is ignored (schedule_progress)
            progress = schedule_progress(it, self.cfg, self.total_iters, self._anchor)
            self.state.schedule_anchor_iter, self.state.schedule_anchor_progress = it, progress
        self.state.planned_iters = total

    @property
    def exit_code(self) -> int:
        """0 for a normal end, 128 + signal number when a signal stopped the run (130 / 143).

        A signal that arrived after the last step (during the final validation or checkpoint) also
        counts: the run is complete, but whoever sent it asked the process to stop, and a caller
        running several trainings (a study) must not start the next.
        """
        signum = self.stop_signal or self.signal_received
        return 128 + signum if signum else 0

    # ---- one step ------------------------------------------------------------------------
    def _forward_loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        image = batch["image"].to(self.device, non_blocking=True)
        label = batch["label"].to(self.device, non_blocking=True)
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        ):
            outputs = self.model(image)
        return self.loss_fn(outputs, label)

    def train_step(self, micro_batches: Sequence[Mapping[str, Any]]) -> StepResult:
        """One optimiser step over ``micro_batches`` (gradient accumulation); skips non-finite steps.

        Raises:
            NonFiniteLossError: ``cfg.max_nonfinite_in_row`` skipped steps in a row; names the cases.
        """
        start = time.monotonic()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        count = len(micro_batches)
        case_ids = [str(c) for b in micro_batches for c in b.get("case_id", [])]
        total = 0.0
        finite = True
        for i, batch in enumerate(micro_batches):
            defer = self.dist.enabled and i < count - 1 and isinstance(self.model, nn.parallel.DistributedDataParallel)
            with self.model.no_sync() if defer else contextlib.nullcontext():
                loss = self._forward_loss(batch) / count
                # Backward is a collective under DDP: every rank must agree to skip it.
                finite = not ddp.any_flags([not bool(torch.isfinite(loss.detach()))], self.device)[0]
                if not finite:
                    break
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += float(loss.detach()) * count
        grad_norm = None
        if finite:
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            max_norm = self.cfg.clip_grad if self.cfg.clip_grad > 0 else math.inf
            grad_norm = float(nn.utils.clip_grad_norm_(self.module.parameters(), max_norm))
            if self.scaler:
                self.scaler.step(self.optimizer)  # the scaler skips the update itself on inf gradients
                self.scaler.update()
            elif math.isfinite(grad_norm):
                self.optimizer.step()
            else:
                finite = False
        lr = float(self.optimizer.param_groups[0]["lr"])
        with warnings.catch_warnings():
            # The schedule follows the step counter even when a skipped step had no optimizer.step().
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
            self.scheduler.step()
        self._count_nonfinite(finite, case_ids)
        return StepResult(
            total / count if finite else None, lr, grad_norm, not finite, case_ids, time.monotonic() - start
        )

    def _count_nonfinite(self, finite: bool, case_ids: list[str]) -> None:
        if finite:
            self.state.nonfinite_in_row = 0
            self.recent_bad_cases = []
            return
        self.state.nonfinite_total += 1
        self.state.nonfinite_in_row += 1
        self.recent_bad_cases.extend(case_ids)
        log.warning("step %d skipped: non-finite loss or gradient (cases %s)", self.state.iteration, case_ids)
        if self.state.nonfinite_in_row >= self.cfg.max_nonfinite_in_row:
            raise NonFiniteLossError(
                "train.max_nonfinite_in_row",
                f"{self.state.nonfinite_in_row} steps in a row had a non-finite loss or gradient; cases: "
                f"{', '.join(self.recent_bad_cases) or 'unknown'}",
                expected="finite images and labels (check these cases), a lower lr, or amp=off",
            )

    # ---- the loop ------------------------------------------------------------------------
    def _next_micro_batches(self, iterator: Any) -> list[Mapping[str, Any]]:
        batches = []
        for _ in range(self.cfg.grad_accum):
            try:
                batches.append(next(iterator))
            except StopIteration:
                raise InputDataError(
                    "train data",
                    "the batch source ran out before the epoch ended",
                    got=f"epoch {self.state.epoch} step {self.state.epoch_iter}",
                    expected=f"{self.cfg.micro_batches_per_epoch} micro-batches per epoch",
                ) from None
        return batches

    def _run_hooks(self, stage: str) -> None:
        for hook in self.hooks:
            getattr(hook, stage)(self)

    def _flush_requests(self) -> None:
        wanted = ["stop", *("latest", "best", "final")]
        local = [bool(self.state.stop_reason)] + [p in self._pending for p in wanted[1:]]
        agreed = ddp.any_flags(local, self.device)
        if agreed[0] and not self.state.stop_reason:
            self.request_stop("stopped by another rank")
        pointers = [p for p, on in zip(wanted[1:], agreed[1:]) if on]
        self._pending.clear()
        if pointers:
            self.save(pointers, tag="final" if "final" in pointers else "step")

    def _end_epoch(self) -> None:
        st = self.state
        st.epoch += 1
        st.epoch_iter = 0
        self.epoch_record = {
            "epoch": st.epoch,
            "iteration": st.iteration,
            "train_loss": st.epoch_loss_sum / st.epoch_loss_count if st.epoch_loss_count else None,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "epoch_time_s": st.epoch_time_s,
            "skipped_total": st.nonfinite_total,
        }
        st.epoch_loss_sum, st.epoch_loss_count, st.epoch_time_s = 0.0, 0, 0.0
        self._run_hooks("after_epoch")
        self.epoch_records.append(self.epoch_record)

    def _stopped_with_workers(self, exc: RuntimeError) -> bool:
        """Take a data worker's death after SIGTERM/SIGINT arrived as that stop (no step is lost).

        Workers ignore the stop signals (:class:`~medgn.train.sampler.WorkerInit`), but one started
        where the signal mask is not inherited (forkserver) can still die of a signal sent to the
        whole process group. One process only: under DDP the other ranks are inside the step.
        """
        if self.signal_received is None or self.dist.enabled:
            return False
        name = signal.Signals(self.signal_received).name
        log.warning("a data loader worker ended after %s (%s): stopping without another step", name, exc)
        self.request_stop(f"received {name}", signum=self.signal_received)
        return True

    def train(self) -> TrainState:
        """Run until :attr:`total_iters` steps are done or a hook stops the run; returns the final counters."""
        cfg, st = self.cfg, self.state
        try:
            self._run_hooks("before_train")
            while st.iteration < self.total_iters and not st.stop_reason:
                iterator = iter(self.source(st.epoch, st.epoch_iter * cfg.grad_accum))
                while not st.stop_reason:
                    tick = time.monotonic()
                    try:
                        batches = self._next_micro_batches(iterator)
                    except RuntimeError as exc:
                        if not self._stopped_with_workers(exc):
                            raise
                        break
                    result = self.last_step = self.train_step(batches)
                    st.iteration += 1
                    st.epoch_iter += 1
                    st.samples_seen += sum(len(b["image"]) for b in batches) * self.dist.world_size
                    if result.loss is not None:
                        st.epoch_loss_sum += result.loss
                        st.epoch_loss_count += 1
                    st.epoch_time_s += time.monotonic() - tick
                    self._run_hooks("after_step")
                    ended = st.epoch_iter >= cfg.iters_per_epoch
                    if ended:
                        self._end_epoch()
                    self._flush_requests()
                    if ended or st.iteration >= self.total_iters:
                        break
            if not st.stop_reason:
                st.stop_reason = "finished"
            self._run_hooks("after_train")
            self._flush_requests()
            log.info("training ended at epoch %d, step %d: %s", st.epoch, st.iteration, st.stop_reason)
        finally:
            for hook in self.hooks:
                hook.close()
        return st

    # ---- state -------------------------------------------------------------------------
    def state_dict(self, rng: list[Any] | None = None) -> dict[str, Any]:
        """The full resumable state (tensors and JSON-able values only)."""
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else {},
            "counters": dataclasses.asdict(self.state),
            "rng": rng if rng is not None else [capture_rng()],
            "sampler": {
                "epoch": self.state.epoch,
                "position": self.state.epoch_iter * self.cfg.grad_accum,
                "seed": self.cfg.seed,
                "world_size": self.dist.world_size,
            },
            "hooks": {h.name: h.state_dict() for h in self.hooks},
            "epoch_records": self.epoch_records,
            "config": self.run_config,
            "config_sha256": config_hash(self.run_config),
            "plan": self.plan,
            "run": self.run_record,
            "versions": versions(),
        }

    def save(self, pointers: Sequence[str] = ("latest",), *, tag: str = "step") -> Path | None:
        """Write a checkpoint (rank 0; every rank contributes its RNG state). Returns its path."""
        rng = ddp.gather_objects(capture_rng())
        if not self.dist.is_main or self.out_dir is None:
            return None
        return save_checkpoint(
            self.state_dict(rng),
            self.out_dir / "checkpoints",
            tag=tag,
            pointers=pointers,
            keep=self.cfg.keep_checkpoints,
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (model, optimiser, schedule, scaler, counters, RNG, hooks)."""
        self.module.load_state_dict(state["model"])
        wanted = [set(group) for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        check_optimizer_groups(self.optimizer, wanted)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        fields = {f.name for f in dataclasses.fields(TrainState)}
        self.state = TrainState(**{k: v for k, v in state["counters"].items() if k in fields})
        self.state.stop_reason = ""
        saved_world = int(state.get("sampler", {}).get("world_size", 1))
        if saved_world != self.dist.world_size and self.dist.is_main:  # said once, on the console too
            warn_user(
                f"resuming a {saved_world}-process run with {self.dist.world_size} processes: data order and RNG "
                "streams change (the result is no longer bit for bit an uninterrupted run's)",
                log,
            )
        rngs = state.get("rng") or []
        if rngs:
            restore_rng(rngs[self.dist.rank] if self.dist.rank < len(rngs) else rngs[0])
        hook_states = state.get("hooks", {})
        for hook in self.hooks:
            if hook.name in hook_states:
                hook.load_state_dict(hook_states[hook.name])
        self.epoch_records = list(state.get("epoch_records", []))

    def resume(self, path: str | Path, state: dict[str, Any] | None = None) -> dict[str, Any]:
        """Continue from a checkpoint (file, pointer or run folder); returns it.

        ``state``: the checkpoint at ``path`` already loaded (and checked) by the caller.
        """
        if state is None:
            # On the CPU: the RNG states must stay CPU byte tensors; load_state_dict moves the rest.
            state = load_checkpoint(path, map_location="cpu")
        old = state.get("config", {}).get("train", {})
        changed = {k: (old.get(k), v) for k, v in to_dict(self.cfg).items() if old.get(k) != v}
        if changed:
            log.info("resuming with train settings other than the checkpoint's: %s", changed)
        try:
            self.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:  # torch's state-dict mismatches
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ModelError(
                path,
                f"the checkpoint does not fit this run's network or optimiser ({first})",
                expected="the model and optimiser settings the run was started with (no --set model.* or "
                "train.optimizer on --resume)",
            ) from exc
        log.info("resumed from %s at epoch %d, step %d", path, self.state.epoch, self.state.iteration)
        return state
