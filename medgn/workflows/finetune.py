"""Fine-tuning: start a training run from another run's weights (``medgn train --init-from``).

This module owns :func:`load_init_source` (a run folder, checkpoint folder, pointer or file, loaded
with ``weights_only=True`` through :mod:`medgn.checkpoint`), :func:`match_weights` (every layer whose
shape matches is loaded; the output heads are re-initialised when the class count differs and the
first convolution when the channel count differs; any other difference means another architecture
and is refused with the list of shapes, exit 4), the per-layer ``init_report.json`` in the run
folder, and :func:`train_from`, which checks the architecture before the run folder is written and
adds the encoder-freezing hook (``train.freeze_encoder_steps``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medgn.config import RunConfig
from medgn.errors import MedgnError, ModelError, UsageError
from medgn.files import atomic_write_json
from medgn.logs import get_logger
from medgn.workflows.train import TrainResult, train_on_dataset

log = get_logger(__name__)

INIT_REPORT = "init_report.json"
FIRST_CONV = "encoder.0.0.conv.weight"  # (features[0], in_channels, k, k, k): channels on dim 1
HEAD_PREFIX = "heads."  # (classes, features, 1, 1, 1) and (classes,): classes on dim 0


class ArchitectureMismatch(ModelError):
    """The --init-from model has another architecture (exit 4)."""


@dataclass
class InitSource:
    """The weights a run starts from, with where they came from."""

    file: Path
    sha256: str
    weights: dict[str, torch.Tensor]
    config: dict[str, Any]
    plan: dict[str, Any]


def load_init_source(path: str | os.PathLike[str]) -> InitSource:
    """Load a run's weights for fine-tuning (its best checkpoint, else final, else latest).

    Raises:
        ModelError: nothing loadable, an unsafe or damaged file, or missing keys (exit 4).
    """
    from medgn.checkpoint import file_sha256, load_checkpoint
    from medgn.infer.predictor import resolve_model_path

    file = resolve_model_path(path)
    state = load_checkpoint(file, map_location="cpu")  # weights_only=True, sha256 checked
    weights = state.get("model")
    if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ModelError(file, "checkpoint has no model weights", expected="a medgn training checkpoint")
    return InitSource(
        file, file_sha256(file), dict(weights), dict(state.get("config") or {}), dict(state.get("plan") or {})
    )


def _warm_head(src: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """A head for another class count that starts where the source's left off.

    Class 0 (background) keeps the source's row; every new foreground class starts from the mean of
    the source's foreground rows: a network that separated, say, cube and ball from background
    then predicts "object" vs background from its first step, instead of from random logits.
    """
    out = fresh.detach().clone()
    out[0] = src[0]
    if src.shape[0] > 1:
        out[1:] = src[1:].mean(dim=0, keepdim=True).to(out.dtype)
    return out


def match_weights(
    model: nn.Module, source: InitSource, channels: tuple[str, ...] = ()
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Which source tensors to load into ``model`` and what happens to every layer.

    ``channels``: the new run's channel names. When they name the source's channels in another
    order (T1c, FLAIR after FLAIR, T1c), the first convolution's input channels are reordered to
    match, so that each filter still sees the modality it learned on.

    Returns:
        (tensors to load, one report row per target tensor: layer, action, shapes, reason).

    Raises:
        ArchitectureMismatch: a difference other than the heads' class count or the first
            convolution's channel count; the message lists source vs target shapes.
    """
    from medgn.planning.plan import channel_names, reordered

    target = model.state_dict()
    order = reordered(channel_names(source.plan), channels)
    load: dict[str, torch.Tensor] = {}
    rows: list[dict[str, Any]] = []
    diffs: list[str] = []
    for key, tensor in target.items():
        src = source.weights.get(key)
        shape = tuple(tensor.shape)
        if src is None:
            diffs.append(f"{key}: not in the source (target {shape})")
            continue
        row = {"layer": key, "source_shape": list(src.shape), "target_shape": list(shape)}
        if tuple(src.shape) == shape and key == FIRST_CONV and order is not None:
            load[key] = src[:, order]
            moved = f"{', '.join(channel_names(source.plan))} -> {', '.join(channels)}"
            rows.append({**row, "action": "loaded", "reason": f"input channels reordered: {moved}"})
        elif tuple(src.shape) == shape:
            load[key] = src
            rows.append({**row, "action": "loaded"})
        elif key == FIRST_CONV and src.shape[0] == shape[0] and src.shape[2:] == shape[2:]:
            rows.append({**row, "action": "reinitialised", "reason": f"input channels {src.shape[1]} -> {shape[1]}"})
        elif key.startswith(HEAD_PREFIX) and src.shape[1:] == shape[1:]:
            load[key] = _warm_head(src, tensor)
            rows.append(
                {
                    **row,
                    "action": "reinitialised",
                    "reason": f"classes {src.shape[0]} -> {shape[0]}",
                    "init": "background row kept, each new class from the mean of the source's foreground classes",
                }
            )
        else:
            diffs.append(f"{key}: source {tuple(src.shape)}, target {shape}")
    diffs += [f"{key}: only in the source ({tuple(v.shape)})" for key, v in source.weights.items() if key not in target]
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; ... {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise ArchitectureMismatch(
            source.file,
            f"--init-from model has another architecture ({len(diffs)} differences): {shown}",
            expected="the same model.features, depth and kernels (only the heads' classes and the first conv's "
            "channels may differ)",
        )
    return load, rows


def _precheck(cfg: RunConfig, source: InitSource) -> None:
    """Build the target network on the source plan's grid and compare, before anything is written.

    Widths and depth come from the config, so a different ``model.features`` fails here; a
    difference that only the dataset's own plan reveals fails in :func:`train_from` (rolled back).
    """
    from medgn.models.registry import build_model

    network = source.plan.get("network") or {}
    stages = len(network.get("strides") or cfg.model.features)
    if cfg.model.features and len(cfg.model.features) < stages:
        raise ModelError(
            source.file,
            f"the source model has {stages} stages, the config's model.features gives {len(cfg.model.features)}",
            got=list(cfg.model.features),
            expected=f"{stages} widths in model.features (the source's depth), or another --init-from",
        )
    features = tuple(cfg.model.features[:stages]) if cfg.model.features else cfg.model.features
    try:
        model = build_model(
            _with_features(cfg, features).model,
            int(source.plan.get("in_channels", 1)),
            int(source.plan.get("num_classes", 2)),
            network.get("strides"),
            network.get("kernel_sizes"),
        )
    except (ValueError, TypeError) as exc:
        raise ModelError(source.file, f"cannot build a network for the source plan ({exc})") from exc
    except UsageError as exc:  # the source plan's network does not fit this config's model section
        raise ModelError(source.file, f"cannot build a network for the source plan ({exc.one_line()})") from exc
    match_weights(model, source)


def _with_features(cfg: RunConfig, features: Any) -> RunConfig:
    import dataclasses

    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, features=features))


def resume_hooks(out_dir: Path, freeze_steps: int) -> list[Any]:
    """The freeze hook of a resumed fine-tuning run (re-initialised layers from its init report)."""
    import json

    from medgn.train.freeze import FreezeEncoderHook

    if freeze_steps <= 0:
        return []
    try:
        reinit = json.loads((out_dir / INIT_REPORT).read_text(encoding="utf-8")).get("reinitialised", [])
    except (OSError, ValueError):
        reinit = []  # not a fine-tuned run: the whole encoder follows the schedule
    return [FreezeEncoderHook(freeze_steps, trainable=reinit)]


def _run_channels(out_dir: Path) -> tuple[str, ...]:
    """The channel names of the run being set up (its plan.json, written before the model is built)."""
    from medgn.planning.plan import Plan, channel_names
    from medgn.workflows.run_folder import RUN_PLAN

    try:
        return channel_names(Plan.load(out_dir / RUN_PLAN))
    except MedgnError:  # no plan of its own (a caller outside medgn train): nothing to reorder by
        return ()


def init_from(
    model: nn.Module, source: InitSource | None, out_dir: Path, freeze_steps: int, resume: bool = False
) -> list[Any]:
    """Load matching weights into ``model``, write ``init_report.json``, return the freeze hook.

    On resume nothing is loaded (the checkpoint holds the weights); only the hook is returned.
    """
    from medgn.train.freeze import FreezeEncoderHook

    if resume or source is None:
        return resume_hooks(out_dir, freeze_steps)
    load, rows = match_weights(model, source, _run_channels(out_dir))
    model.load_state_dict(load, strict=False)
    for row in rows:
        log.info("init-from %s: %s%s", row["layer"], row["action"], f" ({row['reason']})" if "reason" in row else "")
    reinit = [r["layer"] for r in rows if r["action"] != "loaded"]
    loaded = sum(r["action"] == "loaded" for r in rows)
    report = {
        "source": str(source.file),
        "source_sha256": source.sha256,
        "loaded": loaded,
        "reinitialised": reinit,
        "freeze_encoder_steps": freeze_steps,
        "layers": rows,
    }
    from medgn.train.distributed import dist_info_from_env

    if dist_info_from_env().is_main:  # under torchrun every rank loads the same; one writes the report
        atomic_write_json(out_dir / INIT_REPORT, report, overwrite=True)
    log.info("init-from %s: %d tensors loaded, %d re-initialised", source.file, loaded, len(reinit))
    return [FreezeEncoderHook(freeze_steps, trainable=reinit)] if freeze_steps > 0 else []


def train_from(
    cfg: RunConfig,
    data: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    init_path: str | os.PathLike[str],
    **kwargs: Any,
) -> TrainResult:
    """:func:`~medgn.workflows.train.train_on_dataset` starting from another run's weights.

    Raises:
        UsageError: ``resume=True``: a resumed run continues from its own checkpoint, not from
            ``init_path`` (resume it with :func:`~medgn.workflows.train.train_on_dataset`).
        ModelError: the source cannot be loaded or has another architecture (exit 4); nothing is
            left in ``out_dir`` (a run folder this call created is removed again).
    """
    if kwargs.get("resume"):
        raise UsageError(
            "--init-from",
            "cannot be combined with --resume: a resumed run continues from its own checkpoint",
            got=str(init_path),
            expected="--resume alone (a resumed fine-tune keeps its frozen steps), or --init-from with a new --out",
        )
    source = load_init_source(init_path)
    _precheck(cfg, source)
    out = Path(out_dir)
    existed = out.exists()
    freeze = cfg.train.freeze_encoder_steps
    try:
        return train_on_dataset(
            cfg,
            data,
            out,
            init_model=lambda model, run, resume: init_from(model, source, run, freeze, resume),
            **kwargs,
        )
    except ArchitectureMismatch:
        if not existed and out.is_dir():
            shutil.rmtree(out, ignore_errors=True)
        raise
