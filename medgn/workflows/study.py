"""The small-batch normalisation study: the same network with each norm at each batch size.

Group Normalization's claim (Wu & He, 2018) is that GN is flat in the batch size while BatchNorm
degrades as the batch shrinks. :func:`norm_study` trains one run per (norm, batch size) with the
same config, seed and data order, for the same number of samples seen (fewer steps at larger
batches), validates each on the same fold in eval mode (BatchNorm with its running statistics, as a
user would deploy it), and writes ``study.csv``, ``study.md`` and ``study.png`` (validation Dice
against batch size, one line per norm).

SIGINT or SIGTERM stops the whole study: the arm in training finishes its step and checkpoints (as
``medgn train`` does), no further arm starts, and no table or plot is written, since a truncated
arm is no result; :class:`StudyStopped` carries exit 130/143. A signal between arms (while the next
one reads its data) stops the study there. The runs stay in ``runs/``; redoing the study takes a new
``--out`` or removing ``runs/``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import itertools
import json
import math
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from medgn.config import RunConfig
from medgn.configtools import build, to_dict
from medgn.errors import MedgnError, UsageError
from medgn.files import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    make_output_dir,
    missing_folders,
    remove_empty_folders,
)
from medgn.logs import get_logger
from medgn.models.config import UNet3DConfig
from medgn.workflows.train import train_on_dataset

log = get_logger(__name__)

FIELDS = (
    "norm",
    "seed",
    "batch_size",
    "iterations",
    "lr",
    "samples_seen",
    "val_dice_mean",
    "val_dice_per_class",
    "train_loss_last",
    "seconds",
    "stop_reason",
)


STUDY_FILES = ("study.csv", "study.json", "study.md", "study.png")


class StudyStopped(MedgnError):
    """SIGINT or SIGTERM stopped the study before its last arm finished (exit 130 or 143)."""


class _Signalled(BaseException):
    """Raised by the study's own handler, outside an arm's training loop (which has its own)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_signalled(signum: int, frame: Any) -> None:
    raise _Signalled(signum)


@contextlib.contextmanager
def _signals_stop_the_study() -> Iterator[None]:
    """Meanwhile SIGINT/SIGTERM raise :class:`_Signalled`, except where a trainer installed its own handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _raise_signalled) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _stopped(signum: int, out_dir: Path, arm: str, done: int, total: int) -> StudyStopped:
    return StudyStopped(
        out_dir,
        f"study stopped by {signal.Signals(signum).name} in arm {arm} ({done} of {total} arms finished); "
        "no study table or plot written",
        expected=f"a new --out, or removing {out_dir / 'runs'}, to redo the study",
        code=128 + signum,
    )


def _final_record(run: Path) -> dict[str, Any]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    end = next((r for r in reversed(records) if r.get("kind") == "end"), {})
    epochs = [r for r in records if r.get("kind") == "epoch"]
    last = epochs[-1] if epochs else {}
    return {
        "val_dice": end.get("val_dice", last.get("val_dice")),
        "val_mean": end.get("val_mean", last.get("val_mean")),
        "train_loss": last.get("train_loss"),
    }


def norm_study(
    cfg: RunConfig,
    data: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    norms: Sequence[str],
    batch_sizes: Sequence[int],
    *,
    samples: int,
    fold: int = 0,
    device: str = "cpu",
    lr_scaling: str = "none",
    seeds: Sequence[int] = (),
) -> list[dict[str, Any]]:
    """Train and validate every (norm, batch size); returns one row per run and writes the tables.

    Args:
        cfg: base run config (its ``model.norm`` and ``train.batch_size`` are replaced per run).
        data: dataset folder.
        out_dir: study folder; each run goes to ``runs/<norm>_b<batch>_s<seed>`` (a ``:`` in the
            norm's name becomes ``_``); an earlier study's tables there are removed first.
        norms: norm names (``batch``, ``group``, ``instance``, ``group_torch``, ...); a group norm
            may name its group rule: ``group:cpg4`` (4 channels per group at narrow layers, at
            most 32 groups) or ``group:g32`` (32 groups, or one per channel when narrower).
        batch_sizes: batch sizes; each must divide ``samples``.
        samples: training samples seen by every run.
        fold: validation fold.
        device: "cpu" or "cuda".
        lr_scaling: "none" keeps ``train.lr`` for every batch size; "linear" multiplies it by
            batch / smallest batch (the linear scaling rule the Group Normalization paper uses),
            so a larger batch's fewer steps are not also smaller steps.
        seeds: training seeds (weights, data order, augmentation); default: the config's.
    """
    out_dir = Path(out_dir)
    bad = [b for b in batch_sizes if b < 1 or samples % b]
    if bad:
        raise UsageError(
            "--batch-sizes", "every batch size must divide the samples seen", got=bad, expected=f"divisors of {samples}"
        )
    if lr_scaling not in ("none", "linear"):
        raise UsageError("--lr-scaling", "unknown rule", got=lr_scaling, expected="none or linear")
    if cfg.train.grad_accum != 1:  # the arms compare batch sizes: accumulation would multiply them unseen
        raise UsageError(
            "train.grad_accum",
            "a norm study compares batch sizes, which gradient accumulation changes",
            got=cfg.train.grad_accum,
            expected="1 (the batch sizes are --batch-sizes)",
        )
    arms = {norm: norm_arm(cfg.model, norm) for norm in norms}  # fails on a bad name before any run
    configs = {  # every arm's config, built and bound-checked before the study folder is made
        (norm, seed, batch): arm_config(cfg, arms[norm], seed, batch, samples, min(batch_sizes), lr_scaling)
        for norm, seed, batch in itertools.product(norms, list(seeds) or [cfg.train.seed], batch_sizes)
    }
    earlier = list((Path(out_dir) / "runs").glob("*/checkpoints"))
    if earlier:  # its arms would stop at "already has checkpoints" one by one, after others re-ran
        raise UsageError(
            out_dir,
            f"study folder already holds the runs of an earlier study ({len(earlier)})",
            expected="a new --out, or remove its runs/ folder to redo the study",
        )
    created = missing_folders(Path(out_dir) / "runs")  # removed again if the first arm is refused
    make_output_dir(out_dir, "study folder")
    for name in STUDY_FILES:  # an earlier study's table must not sit beside runs it does not describe
        (out_dir / name).unlink(missing_ok=True)
    try:
        rows = _run_arms(configs, data, Path(out_dir), fold, device)
    except MedgnError:
        remove_empty_folders(created)  # only empty ones: a refused first arm leaves no study folder
        raise
    write_study(
        rows,
        out_dir,
        settings={
            "samples": samples,
            "fold": fold,
            "device": device,
            "lr_scaling": lr_scaling,
            "seeds": list(seeds) or [cfg.train.seed],
            "config": cfg.to_dict(),
        },
    )
    return rows


def _run_arms(
    configs: dict[tuple[str, int, int], RunConfig], data: Any, out_dir: Path, fold: int, device: str
) -> list[dict[str, Any]]:
    """Train every (norm, seed, batch size) arm of ``configs`` in order; one row per arm.

    Raises:
        StudyStopped: SIGINT or SIGTERM arrived (exit 130/143); no further arm runs.
    """
    rows: list[dict[str, Any]] = []
    plan = list(configs)
    arm = ""
    try:
        with _signals_stop_the_study():
            for norm, seed, batch in plan:
                arm = f"{norm.replace(':', '_')}_b{batch}_s{seed}"
                run_cfg = configs[norm, seed, batch]
                iterations, lr = run_cfg.train.iters_per_epoch, run_cfg.train.lr
                run_dir = out_dir / "runs" / arm
                log.info("study: norm %s, seed %d, batch %d, %d iterations", norm, seed, batch, iterations)
                print(f"study: norm={norm} seed={seed} batch={batch} iterations={iterations}", flush=True)
                start = time.monotonic()
                result = train_on_dataset(run_cfg, data, run_dir, fold=fold, device=device, console=False)
                if result.exit_code:  # its trainer took the signal: the arm stopped early and checkpointed
                    raise _Signalled(result.exit_code - 128)
                record = _final_record(run_dir)
                dice = record["val_dice"] or []
                rows.append(
                    {
                        "norm": norm,
                        "seed": seed,
                        "batch_size": batch,
                        "iterations": iterations,
                        "lr": lr,
                        "samples_seen": result.state.samples_seen,
                        "val_dice_mean": record["val_mean"],
                        "val_dice_per_class": [round(float(d), 4) for d in dice],
                        "train_loss_last": record["train_loss"],
                        "seconds": round(time.monotonic() - start, 1),
                        "stop_reason": result.state.stop_reason,
                    }
                )
    except _Signalled as exc:
        raise _stopped(exc.signum, out_dir, arm, len(rows), len(plan)) from None
    return rows


def arm_config(
    cfg: RunConfig, model: UNet3DConfig, seed: int, batch: int, samples: int, smallest: int, lr_scaling: str
) -> RunConfig:
    """One arm's run config: one epoch of ``samples // batch`` steps, validated once at its end.

    The learning rate scales with the batch under ``linear``; the warmup covers the same samples in
    every arm (``train.warmup_iters`` is steps at the smallest batch), never the whole run. Built
    through the config's own checks, so a scaled learning rate above its bound is refused.
    """
    iterations = samples // batch
    # Rounded up, so that a warmup never vanishes at a larger batch (1 step at batch 1 stays 1 at batch 4).
    warmup = min(math.ceil(cfg.train.warmup_iters * smallest / batch), iterations - 1)
    train = {
        **to_dict(cfg.train),
        "lr": cfg.train.lr * (batch / smallest if lr_scaling == "linear" else 1.0),
        "batch_size": batch,
        "epochs": 1,
        "iters_per_epoch": iterations,
        "val_every": 0,
        "warmup_iters": warmup,
        "early_stopping_patience": 0,
        "seed": seed,
        "time_budget_minutes": 0.0,
    }
    try:
        return dataclasses.replace(cfg, model=model, train=build(type(cfg.train), train, "train"))
    except UsageError as exc:
        raise UsageError(
            exc.where, f"the arm at batch {batch}: {exc.what}", got=exc.got, expected=exc.expected
        ) from None


def norm_arm(model: UNet3DConfig, spec: str) -> UNet3DConfig:
    """The model section of one study arm: ``name`` or ``group:cpgK`` / ``group:gG`` (see norm_study)."""
    name, _, rule = spec.partition(":")
    if not rule:
        return dataclasses.replace(model, norm=name)  # type: ignore[arg-type]
    if name not in ("group", "group_torch") or not (
        rule[:3] == "cpg" and rule[3:].isdigit() or rule[:1] == "g" and rule[1:].isdigit()
    ):
        raise UsageError(
            "--norms",
            "unknown group rule",
            got=spec,
            expected="group:cpgK (K channels per group) or group:gG (G groups)",
        )
    groups = (
        {"group_channels": int(rule[3:]), "num_groups": None}
        if rule.startswith("cpg")
        else {"num_groups": int(rule[1:]), "group_channels": None}
    )
    try:  # built through the config's own checks: e.g. 0 channels per group is refused
        return build(UNet3DConfig, {**to_dict(model), "norm": name, **groups}, "model")
    except UsageError as exc:
        raise UsageError("--norms", f"invalid arm {spec!r} ({exc.one_line()})") from None


def _csv(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "val_dice_per_class": " ".join(str(d) for d in row["val_dice_per_class"])})
    return buffer.getvalue()


def _markdown(rows: Sequence[dict[str, Any]], settings: dict[str, Any]) -> str:
    norms = list(dict.fromkeys(r["norm"] for r in rows))
    batches = sorted({r["batch_size"] for r in rows})
    lines = [
        "# Normalisation vs batch size: validation Dice",
        "",
        "Same network and data order per seed (cells: mean over seeds, then each seed); "
        f"{settings['samples']} training samples per run; fold {settings['fold']}; device {settings['device']}; "
        f"learning-rate scaling with batch size: {settings.get('lr_scaling', 'none')}.",
        "BatchNorm is evaluated in eval mode with its running statistics.",
        "",
        "| norm | " + " | ".join(f"batch {b}" for b in batches) + " |",
        "|---|" + "---|" * len(batches),
    ]
    for norm in norms:
        cells = []
        for b in batches:
            values = [r["val_dice_mean"] for r in rows if r["norm"] == norm and r["batch_size"] == b]
            values = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
            if not values:
                cells.append("n/a")
            elif len(values) == 1:
                cells.append(f"{values[0]:.4f}")
            else:  # mean over seeds, then each seed
                cells.append(f"{sum(values) / len(values):.4f} ({', '.join(f'{v:.3f}' for v in values)})")
        lines.append(f"| {norm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_study(rows: Sequence[dict[str, Any]], out_dir: Path, settings: dict[str, Any]) -> None:
    """Write study.csv, study.json, study.md and study.png (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    atomic_write_text(out_dir / "study.csv", _csv(rows))
    atomic_write_json(out_dir / "study.json", {"settings": settings, "rows": list(rows)})
    atomic_write_text(out_dir / "study.md", _markdown(rows, settings))
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for norm in dict.fromkeys(r["norm"] for r in rows):
        by_batch: dict[int, list[float]] = {}
        for r in rows:
            if r["norm"] == norm and r["val_dice_mean"] is not None:
                by_batch.setdefault(r["batch_size"], []).append(float(r["val_dice_mean"]))
        pts = sorted((b, sum(v) / len(v)) for b, v in by_batch.items())
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=norm)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("validation Dice (mean over classes)")
    ax.set_title(f"{settings['samples']} samples per run")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out_dir / "study.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
