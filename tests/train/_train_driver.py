"""A tiny deterministic training run used by the trainer tests through a subprocess.

It trains a small deep-supervised Conv3d/GroupNorm network (with dropout, so the torch RNG
matters) on synthetic 8^3 volumes whose augmentation is seeded per sample, using the real trainer,
sampler, checkpoints and hooks. Options inject faults: SIGKILL after a step, SIGKILL inside the
N-th checkpoint save (between the temporary write and the rename), SIGTERM during a step. Run it
directly (``python tests/train/_train_driver.py --out DIR``) or under ``torch.distributed.run``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import medgn.files
from medgn.configtools import build
from medgn.errors import MedgnError
from medgn.train import distributed as ddp
from medgn.train.config import TrainConfig
from medgn.train.hooks import HookBase
from medgn.train.logging_hooks import default_hooks
from medgn.train.rng import seed_everything
from medgn.train.sampler import ResumableLoader, ResumableSampler
from medgn.train.trainer import Trainer

SIZE = 8  # 8^3 voxels: big enough for two resolution levels, small enough for 2 CPU cores
NUM_CASES = 6


class TinyNet(nn.Module):
    """Conv-GN-LeakyReLU-Dropout, a full-resolution head and a half-resolution head in training."""

    def __init__(self, channels: int = 4, classes: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, channels, 3, padding=1)
        self.norm = nn.GroupNorm(2, channels)
        self.drop = nn.Dropout3d(0.1)  # consumes the torch RNG every step
        self.head = nn.Conv3d(channels, classes, 1)
        self.head_low = nn.Conv3d(channels, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        feat = self.drop(F.leaky_relu(self.norm(self.conv(x)), 0.01))
        out = self.head(feat)
        if self.training:
            return [out, self.head_low(F.avg_pool3d(feat, 2))]
        return out


def make_case(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (1, S, S, S) image and label: a cube whose position depends on the case index."""
    label = torch.zeros(1, SIZE, SIZE, SIZE, dtype=torch.int64)
    a = 1 + index % 3
    label[:, a : a + 4, 2:6, a : a + 3] = 1
    gen = torch.Generator().manual_seed(1000 + index)
    image = label.float() * 2 - 1 + 0.3 * torch.randn(label.shape, generator=gen)
    return image, label


class SyntheticCases(torch.utils.data.Dataset):
    """Cases with flip and noise augmentation seeded by the sampler's per-sample seed."""

    def __init__(self, nan_cases: Sequence[int] = ()) -> None:
        self.nan_cases = set(nan_cases)

    def __len__(self) -> int:
        return NUM_CASES

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        image, label = make_case(index)
        gen = torch.Generator().manual_seed(seed)
        if torch.rand((), generator=gen) < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        image = image + 0.1 * torch.randn(image.shape, generator=gen)
        if index in self.nan_cases:
            image = image.clone().fill_(float("nan"))
        return {"image": image, "label": label, "case_id": f"case_{index:03d}"}


def validate(model: nn.Module) -> list[float]:
    """Dice of the foreground on two fixed cases."""
    inter = total = 0.0
    for index in (0, 1):
        image, label = make_case(index)
        pred = model(image[None]).argmax(1)
        inter += float(((pred == 1) & (label[:, 0] == 1)).sum())
        total += float((pred == 1).sum() + (label[:, 0] == 1).sum())
    return [2 * inter / total if total else 1.0]


class FaultHook(HookBase):
    """SIGKILL this process right after step ``kill_at``."""

    name = "fault"

    def __init__(self, kill_at: int) -> None:
        self.kill_at = kill_at

    def after_step(self, trainer: Trainer) -> None:
        if trainer.state.iteration == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_inside_save(n: int) -> None:
    """SIGKILL inside the n-th checkpoint write, after the temporary file is complete."""
    real_replace = medgn.files.os.replace
    seen = [0]

    def replace(src: str, dst: str) -> None:
        if str(dst).endswith(".pt"):
            seen[0] += 1
            if seen[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)

    medgn.files.os.replace = replace


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--ckpt-steps", type=int, default=3)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at-step", type=int, default=0)
    parser.add_argument("--kill-in-save", type=int, default=0)
    parser.add_argument("--sigterm-at-step", type=int, default=0)
    parser.add_argument("--nan-cases", type=int, nargs="*", default=[])
    parser.add_argument("--max-nonfinite", type=int, default=3)
    parser.add_argument("--keep", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one thread: CPU reductions in a fixed order, bit-exact reruns
    cfg = build(
        TrainConfig,
        {
            "epochs": args.epochs,
            "iters_per_epoch": args.iters,
            "batch_size": 2,
            "lr": 0.05,
            "amp": "off",
            "checkpoint_every_steps": args.ckpt_steps,
            "checkpoint_every_minutes": 0.0,
            "deterministic": True,
            "seed": 7,
            "log_every": 2,
            "max_nonfinite_in_row": args.max_nonfinite,
            "warmup_iters": 2,
            "keep_checkpoints": args.keep,
        },
        "train",
    )
    info = ddp.dist_info_from_env()
    sampler = ResumableSampler(
        NUM_CASES,
        cfg.micro_batches_per_epoch * cfg.batch_size,
        seed=cfg.seed,
        rank=info.rank,
        world_size=info.world_size,
        with_seeds=True,
    )
    loader = ResumableLoader(SyntheticCases(args.nan_cases), sampler, cfg.batch_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hooks = default_hooks(cfg, out, validate=validate, console=False)
    if args.kill_at_step:
        hooks.append(FaultHook(args.kill_at_step))
    if args.kill_in_save:
        kill_inside_save(args.kill_in_save)
    seed_everything(cfg.seed + info.rank, deterministic=cfg.deterministic)  # before the weights are drawn
    model = TinyNet()
    if args.sigterm_at_step:
        step_counter = [0]
        real_forward = model.forward

        def forward(x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
            step_counter[0] += 1
            if step_counter[0] == args.sigterm_at_step:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of this step
            return real_forward(x)

        model.forward = forward  # type: ignore[method-assign]
    trainer = Trainer(model, cfg, loader, out_dir=out, hooks=hooks, plan={"patch_size": [SIZE] * 3})
    try:
        if args.resume:
            trainer.resume(out)
        state = trainer.train()
    except MedgnError as exc:
        sys.stderr.write(f"medgn: error: {exc.one_line()}\n")
        return exc.code
    finally:
        ddp.cleanup()
    print(f"done: {state.stop_reason} at step {state.iteration}")
    return trainer.exit_code


if __name__ == "__main__":
    sys.exit(main())
