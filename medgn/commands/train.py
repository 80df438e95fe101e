"""``medgn train``: train a U-Net on a dataset folder (one GPU, the CPU, or torchrun DDP)."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
from pathlib import Path

from medgn.errors import UsageError
from medgn.files import is_inside
from medgn.planning.splits import ALL_FOLDS

# One or more <number><unit> parts ("20m", "1h30m", "90 s", "20min"); a bare number is minutes.
_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*)\s*")  # ASCII digits: "١٢m" is no duration
_UNITS = {
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1 / 60),
    **dict.fromkeys(("", "m", "min", "mins", "minute", "minutes"), 1.0),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 60.0),
}


def parse_duration_minutes(text: str) -> float:
    """'30m', '2h', '1h30m', '90s', '20 min' or a bare number of minutes -> minutes (> 0)."""
    body = text.strip().lower()
    parts = list(_PART.finditer(body))
    whole = bool(parts) and "".join(p.group(0) for p in parts) == body
    bare = len(parts) > 1 and any(p.group(2) == "" for p in parts)  # "1h 30" is ambiguous
    if not whole or bare or any(p.group(2) not in _UNITS for p in parts):
        raise UsageError(
            "--time-budget",
            "invalid duration",
            got=text,
            expected="a number with unit s, m or h (e.g. 30m, 1h30m; a bare number is minutes)",
        )
    minutes = sum(float(p.group(1)) * _UNITS[p.group(2)] for p in parts)
    if minutes <= 0:
        raise UsageError("--time-budget", "must be longer than zero", got=text, expected="e.g. 20m")
    return minutes


def parse_fold(text: str) -> int:
    if text == "all":
        return ALL_FOLDS
    try:
        fold = int(text)
    except ValueError:
        fold = -1
    if fold < 0:  # -1 is how 'all' is stored: it must be asked for by name
        raise UsageError("--fold", "invalid fold", got=text, expected="a fold number 0, 1, ... or 'all'")
    return fold


def default_run_dir(data: str, config: str | None, fold: int) -> str:
    """The run folder when --out is not given: runs/<dataset>-<config>-fold<N>, or -all.

    The same command (and its --resume) always names the same folder. The dataset is named as
    typed (a symbolic link by its own name), the config by its file name without .yaml/.yml.
    Characters other than letters (any script), digits, ".", "_" and "-" become "_"; a name that
    changed that way gets 8 hex digits of its original's sha256, so that "Herz v2" and "Herz_v2"
    (or two all-symbol names) never share a run folder.
    """

    def clean(name: str, fallback: str) -> str:
        cleaned = re.sub(r"[^\w.-]", "_", name).strip("._-") or fallback
        if cleaned != name:
            cleaned += "_" + hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        return cleaned

    dataset = clean(Path(os.path.abspath(data)).name, "dataset")
    recipe = "default"
    if config:
        recipe = clean(re.sub(r"\.ya?ml$", "", Path(config).name, flags=re.IGNORECASE), "config")
    return str(Path("runs") / f"{dataset}-{recipe}-{'all' if fold == ALL_FOLDS else f'fold{fold}'}")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train a model on a dataset (verify, plan, train, validate)")
    parser.add_argument("--config", help="run config YAML (configs/*.yaml); defaults when omitted")
    parser.add_argument("--data", required=True, help="dataset folder (MSD, nnU-Net v2 raw, or images/ + labels/)")
    parser.add_argument(
        "--out",
        help="run folder to create (checkpoints, logs, plots); default runs/<dataset>-<config>-fold<N> "
        "(runs/<dataset>-<config>-all for --fold all) in the current folder",
    )
    parser.add_argument("--fold", default="0", help="cross-validation fold (0-based) or 'all' (default 0)")
    parser.add_argument("--plan", help="plan JSON from 'medgn plan' (default: made and stored in the run folder)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out (or the default folder) from its last checkpoint",
    )
    parser.add_argument(
        "--allow-changed-settings",
        action="store_true",
        help="with --resume: accept settings that change what training computes (lr, batch, seed, augmentation...; "
        "listed as a warning and recorded in run.json); without it such a resume is refused",
    )
    parser.add_argument(
        "--verify", action="store_true", help="check every case again on --resume (always checked on a new run)"
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu"
    )
    parser.add_argument(
        "--time-budget", help="stop cleanly after this long (e.g. 30m, 2h, 1h30m; a bare number is minutes)"
    )
    parser.add_argument(
        "--init-from",
        metavar="RUN_OR_CHECKPOINT",
        help="fine-tune: start from this run's weights (heads re-initialised for another class count, the "
        "first conv for another channel count)",
    )
    parser.add_argument(
        "--freeze-encoder-steps",
        type=int,
        metavar="N",
        help="with --init-from: keep the loaded encoder frozen for the first N steps (train.freeze_encoder_steps)",
    )
    parser.add_argument(
        "--max-resampled-voxels",
        type=int,
        default=None,
        help="largest volume once resampled to the plan's spacing (config data.limits.max_resampled_voxels)",
    )
    parser.add_argument(
        "--max-windows",
        type=int,
        default=None,
        help="most sliding windows one validation case may need (config data.limits.max_windows)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no live progress display (logs only)")
    parser.set_defaults(func=run)


# Config keys that flags of this command set, for errors about their values.
_FLAG_KEYS = {
    "train.time_budget_minutes": "--time-budget",
    "train.freeze_encoder_steps": "--freeze-encoder-steps",
    "data.limits.max_resampled_voxels": "--max-resampled-voxels",
    "data.limits.max_windows": "--max-windows",
}


def _recorded_freeze(out: Path) -> int:
    """The encoder-freezing steps a run's resolved config records (0 when none or unreadable)."""
    import yaml

    try:
        steps = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))["train"]["freeze_encoder_steps"]
    except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError):
        return 0
    return steps if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 else 0


def run(args: argparse.Namespace) -> int:
    import torch

    from medgn.config import load_run_config
    from medgn.workflows.train import train_on_dataset

    overrides = list(args.set)
    if args.time_budget:
        overrides.append(f"train.time_budget_minutes={parse_duration_minutes(args.time_budget)}")
    if args.freeze_encoder_steps is not None:
        overrides.append(f"train.freeze_encoder_steps={args.freeze_encoder_steps}")
    if args.max_resampled_voxels is not None:
        overrides.append(f"data.limits.max_resampled_voxels={args.max_resampled_voxels}")
    if args.max_windows is not None:
        overrides.append(f"data.limits.max_windows={args.max_windows}")
    fold = parse_fold(args.fold)
    if args.init_from and args.resume:
        raise UsageError(
            "--init-from",
            "cannot be combined with --resume: a resumed run continues from its own checkpoint",
            got=args.init_from,
            expected="--resume alone (a resumed fine-tune keeps its frozen steps), or --init-from with a new --out",
        )
    if args.allow_changed_settings and not args.resume:
        raise UsageError("--allow-changed-settings", "only applies to --resume", expected="--resume, or no such flag")
    if args.out is None:
        args.out = default_run_dir(args.data, args.config, fold)
        if is_inside(args.out, args.data):
            raise UsageError(
                args.out,
                "the default run folder (runs/ in the current folder) would be inside the dataset",
                expected="--out outside the dataset, or run the command from another folder",
            )
    frozen = _recorded_freeze(Path(args.out)) if args.resume else 0
    if frozen and not any(o.startswith("train.freeze_encoder_steps=") for o in overrides):
        overrides.append(f"train.freeze_encoder_steps={frozen}")  # a resumed fine-tune freezes as it began
    try:
        cfg = load_run_config(args.config, overrides)
    except UsageError as exc:  # a value from a flag: named as typed (the config key is in the message)
        flag = _FLAG_KEYS.get(exc.where)
        if flag is not None and getattr(args, flag[2:].replace("-", "_"), None) is not None:
            raise UsageError(flag, f"{exc.what} (config {exc.where})", got=exc.got, expected=exc.expected) from None
        raise
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = {
        "fold": fold,
        "resume": args.resume,
        "device": device,
        "plan_path": args.plan,
        "console": not args.no_progress,
        "verify": True if args.verify else None,
        "allow_changed_settings": args.allow_changed_settings,
    }
    if args.init_from:
        from medgn.workflows.finetune import train_from

        result = train_from(cfg, args.data, args.out, args.init_from, **kwargs)
    elif cfg.train.freeze_encoder_steps and args.resume:
        from medgn.workflows.finetune import init_from

        freeze = cfg.train.freeze_encoder_steps
        result = train_on_dataset(
            cfg,
            args.data,
            args.out,
            init_model=lambda model, run, resume: init_from(model, None, run, freeze, True),
            **kwargs,
        )
    else:
        if cfg.train.freeze_encoder_steps:
            raise UsageError(
                "train.freeze_encoder_steps",
                "freezing the encoder needs loaded weights",
                got=cfg.train.freeze_encoder_steps,
                expected="--init-from RUN, or 0",
            )
        result = train_on_dataset(cfg, args.data, args.out, **kwargs)
    smoothed = " (EMA)" if cfg.train.ema_alpha > 0 else ""
    best = f", best validation Dice{smoothed} {result.best_dice:.4f}" if result.best_dice is not None else ""
    print(
        f"training stopped ({result.state.stop_reason or 'finished'}) at epoch {result.state.epoch}, step "
        f"{result.state.iteration}{best}; run folder {result.out_dir}"
    )
    return result.exit_code
