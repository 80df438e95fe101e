"""Optimiser, learning-rate schedule and mixed-precision choice built from a :class:`TrainConfig`.

The schedule is a :class:`torch.optim.lr_scheduler.LambdaLR` over optimiser steps: linear warmup,
then nnU-Net's poly decay ``(1 - t/T) ** 0.9`` or a half-cosine, so its state is two integers and a
few floats (checkpoint-safe). :func:`resolve_amp` turns ``amp: auto|bf16|fp16|off`` into an
autocast dtype and whether a gradient scaler is needed on the device at hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from medgn.environment import cpu_bf16_supported, cuda_bf16_supported
from medgn.errors import UsageError
from medgn.train.config import TrainConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (nnU-Net) or AdamW, as ``cfg.optimizer`` says."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay
        )
    # foreach=False: one kernel per tensor keeps CPU results independent of tensor grouping.
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)


def schedule_progress(step: int, cfg: TrainConfig, total: int, anchor: tuple[int, float] = (0, 0.0)) -> float:
    """How far the decay is at optimiser step ``step``, in [0, 1].

    Without an anchor the decay runs linearly from the end of warmup to ``total``. When a time
    budget changes the length mid-run, the trainer anchors the schedule at the step of the change:
    ``anchor = (step, progress there)``, and the rest of the decay runs linearly from that
    progress to 1 at the new ``total``. The learning rate then stays continuous instead of jumping
    to where a schedule of the new length would have been.
    """
    a_step, a_t = anchor
    if a_step > 0 and a_step >= cfg.warmup_iters:
        t = a_t + (1.0 - a_t) * (step - a_step) / max(1, total - a_step)
    else:
        t = (step - cfg.warmup_iters) / max(1, total - cfg.warmup_iters)
    return min(max(t, 0.0), 1.0)


def lr_factor(step: int, cfg: TrainConfig, total: int | None = None, anchor: tuple[int, float] = (0, 0.0)) -> float:
    """Multiplier of ``cfg.lr`` at optimiser step ``step`` (0-based) of a ``total``-step schedule.

    ``total`` defaults to ``cfg.total_iters``; a time budget can fix another length, anchored at
    the step where it changed (see :func:`schedule_progress`).
    """
    total = cfg.total_iters if total is None else total
    if cfg.warmup_iters and step < cfg.warmup_iters:
        return (step + 1) / cfg.warmup_iters
    if cfg.schedule == "constant":
        return 1.0
    t = schedule_progress(step, cfg, total, anchor)
    if cfg.schedule == "poly":
        return (1.0 - t) ** cfg.poly_exponent
    return 0.5 * (1.0 + math.cos(math.pi * t))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    total: Callable[[], int] | None = None,
    anchor: Callable[[], tuple[int, float]] | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR following :func:`lr_factor`.

    ``total()`` gives the schedule's current length and ``anchor()`` where it last changed.
    """
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, cfg, total() if total else None, anchor() if anchor else (0, 0.0)),
    )


def resolve_amp(mode: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """Autocast dtype (None = full fp32) and whether a GradScaler is needed.

    ``auto`` is bf16 on a GPU that supports it, fp16 with a scaler on an older GPU, bf16 on a CPU
    with native bf16 instructions (AVX512-BF16/AMX: a 3D U-Net step runs about 2x faster than
    fp32 there) and fp32 on other CPUs, where bf16 is emulated and slower.

    Raises:
        UsageError: fp16 asked for on the CPU, or bf16 on a GPU without bf16.
    """
    if mode == "off":
        return None, False
    is_cuda = device.type == "cuda"
    bf16_ok = cuda_bf16_supported(device) if is_cuda else True
    if mode == "auto":
        if not is_cuda:
            return (torch.bfloat16, False) if cpu_bf16_supported() else (None, False)
        return (torch.bfloat16, False) if bf16_ok else (torch.float16, True)
    if mode == "bf16":
        if not bf16_ok:
            raise UsageError("train.amp", "this GPU has no bf16 support", got=mode, expected="fp16, auto or off")
        return torch.bfloat16, False
    if not is_cuda:
        raise UsageError(
            "train.amp", "fp16 mixed precision needs a CUDA device", got=mode, expected="bf16, auto or off on the CPU"
        )
    return torch.float16, True


def check_optimizer_groups(optimizer: torch.optim.Optimizer, wanted: list[set[str]]) -> None:
    """Refuse a loaded optimiser state that lacks settings ``optimizer`` steps with (``wanted``,
    its groups' keys before loading): the state of another optimiser, which torch loads and
    then fails on at the next step (SGD without ``momentum``)."""
    for own, group in zip(wanted, optimizer.param_groups):
        missing = sorted(own - set(group))
        if missing:
            raise ValueError(
                f"the optimiser state lacks {', '.join(missing)}: it was written by another optimiser "
                f"than this run's {type(optimizer).__name__}"
            )
