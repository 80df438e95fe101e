"""Loading trained models for inference: checkpoint resolution, validation and fold ensembles.

This module owns :class:`Predictor` (the eval-mode networks, the data plan they share, the sha256 of
every checkpoint and a hash of their configs) and :func:`load_predictor`, which accepts run
folders, checkpoint folders, pointer files (``best.json``) or checkpoint files. A run folder
resolves to its best checkpoint, else its final one, else its latest (the rule lives in
:func:`medgn.checkpoint.resolve_checkpoint`). Each checkpoint file is read once, hashed and loaded
with ``torch.load(..., weights_only=True)`` from the same bytes; the plan is checked by
:meth:`medgn.planning.plan.Plan.from_dict`; a missing, corrupt or
code-carrying file, missing keys, an architecture that does not match the weights (listed as
expected vs found shapes) or non-finite weights raise :class:`~medgn.errors.ModelError` (exit 4)
naming the file. Several checkpoints are an ensemble (folds) only when their plans agree on
channels, classes, labels, spacing, normalisation and patch size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medgn.checkpoint import POINTERS
from medgn.errors import ModelError, UsageError
from medgn.files import json_sha256
from medgn.infer.config import InferConfig
from medgn.planning.plan import Plan

__all__ = [
    "ModelSource",
    "Predictor",
    "load_predictor",
    "merge_infer_defaults",
    "resolve_model_path",
    "state_dict_sha256",
]


@dataclass(frozen=True)
class ModelSource:
    """Where one model came from: the checkpoint file and its sha256."""

    path: str
    sha256: str


@dataclass
class Predictor:
    """Networks ready for inference with the plan they were trained on.

    Attributes:
        models: eval-mode networks on ``device``; their softmax outputs are averaged.
        plan: the data plan the networks were trained with.
        sources: one :class:`ModelSource` per model.
        config_hash: sha256 over every model's resolved config and plan.
        device: where the networks run.
        defaults: the inference defaults the models carry (their configs' ``infer`` sections,
            merged by :func:`merge_infer_defaults`).
    """

    models: list[nn.Module]
    plan: Plan
    sources: list[ModelSource]
    config_hash: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    defaults: InferConfig = field(default_factory=InferConfig)

    @property
    def label_values(self) -> list[int]:
        """Raw label value written for class index i (identity when the plan has none)."""
        return list(self.plan.label_values)

    def run_dirs(self) -> list[Path]:
        """The run folder of each model (the folder holding its ``checkpoints/``), or the checkpoint's folder."""
        out = []
        for source in self.sources:
            folder = Path(source.path).parent
            out.append(folder.parent if folder.name == "checkpoints" else folder)
        return out

    @property
    def model_sha256s(self) -> list[str]:
        """The sha256 of every model, in order."""
        return [s.sha256 for s in self.sources]

    @classmethod
    def from_modules(
        cls,
        models: Sequence[nn.Module],
        plan: Plan | Mapping[str, Any],
        *,
        device: str | torch.device = "cpu",
        name: str = "module",
    ) -> Predictor:
        """Wrap networks built in Python (no checkpoint file); their sha256 is over the weights.

        Args:
            models: networks mapping (B, C, *patch) to logits (B, K, *patch).
            plan: the plan they were trained on (see :class:`Predictor`).
            device: where they run.
            name: recorded as the source path.
        """
        typed = Plan.from_dict(plan, name, error=ModelError)
        dev = torch.device(device)
        mods = [m.to(dev).eval() for m in models]
        sources = [ModelSource(f"{name}[{i}]", state_dict_sha256(m)) for i, m in enumerate(mods)]
        raw = typed.to_dict() if isinstance(plan, Plan) else dict(plan)
        return cls(mods, typed, sources, json_sha256([{"plan": raw}] * len(mods)), dev)


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over a module's state-dict names, dtypes, shapes and bytes (stable across runs)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)  # 0-d tensors cannot be viewed as bytes
        digest.update(f"{key}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def resolve_model_path(path: str | os.PathLike[str]) -> Path:
    """The checkpoint file a run folder, checkpoint folder, pointer or file names (best > final > latest).

    Raises:
        ModelError: nothing usable at ``path`` (the message lists what was looked for).
    """
    from medgn.checkpoint import INFERENCE_ORDER, resolve_checkpoint

    path = Path(path)
    if not path.exists():
        raise ModelError(path, "model not found", expected="a run folder, a checkpoints folder or a checkpoint file")
    return resolve_checkpoint(path, INFERENCE_ORDER)[0]


def _shape_diff(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> list[str]:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in weights.items() if isinstance(v, torch.Tensor)}
    diffs = [
        f"{k}: expected {expected[k]}, found {found[k]}" for k in expected if k in found and expected[k] != found[k]
    ]
    diffs += [f"{k}: missing (expected {expected[k]})" for k in expected if k not in found]
    diffs += [f"{k}: unexpected (found {found[k]})" for k in found if k not in expected]
    return diffs


def merge_infer_defaults(defaults: Sequence[InferConfig]) -> InferConfig:
    """One set of inference defaults for an ensemble.

    Test-time mirroring is on when any model asks for it, over the axes every model that asks for
    it mirrors (a flip one of them was not trained for would hurt that model's share). The layout
    (``memory_format``) is each model's own, applied when it is loaded, so the merge leaves it unset.
    """
    wanting = [d for d in defaults if d.tta]
    if not wanting:
        return InferConfig()
    common = [a for a in wanting[0].mirror_axes if all(a in d.mirror_axes for d in wanting[1:])]
    return InferConfig(tta=True, mirror_axes=tuple(common)) if common else InferConfig()


def _load_one(
    path: str | os.PathLike[str], device: torch.device
) -> tuple[nn.Module, Plan, ModelSource, dict[str, Any], InferConfig]:
    """One checkpoint: the eval-mode network (in its inference layout), its plan, its source, the
    record the config hash covers and its inference defaults."""
    from medgn.checkpoint import INFERENCE_ORDER, read_checkpoint
    from medgn.configtools import build
    from medgn.models.config import UNet3DConfig
    from medgn.models.registry import build_model

    resolve_model_path(path)  # a clear error for a missing path or an empty folder
    state, file, sha256 = read_checkpoint(
        path, map_location="cpu", prefer=INFERENCE_ORDER
    )  # one read: hashed and loaded
    missing = [k for k in ("model", "config", "plan") if k not in state]
    if missing:
        raise ModelError(
            file,
            "checkpoint is missing keys: " + ", ".join(missing),
            got=f"keys {sorted(map(str, state))[:8]}",
            expected="model, config and plan",
        )
    weights, config, raw_plan = state["model"], state["config"], state["plan"]
    if not isinstance(weights, Mapping) or not isinstance(config, Mapping):
        raise ModelError(
            file, "checkpoint 'model' or 'config' is not a mapping", expected="a state dict and a config dict"
        )
    plan = Plan.from_dict(raw_plan, file, error=ModelError)
    try:
        cfg = build(UNet3DConfig, config.get("model", {}), "model")
    except UsageError as exc:
        raise ModelError(file, f"checkpoint config does not describe a model ({exc.one_line()})") from exc
    defaults = _infer_defaults(config, str(file))
    if defaults.memory_format is not None:
        cfg = dataclasses.replace(cfg, memory_format=defaults.memory_format)
    try:
        model = build_model(cfg, plan.in_channels, plan.num_classes, plan.network.strides, plan.network.kernel_sizes)
    except (UsageError, ModelError, ValueError, TypeError) as exc:
        raise ModelError(file, f"cannot build the checkpoint's network ({exc})") from exc
    diffs = _shape_diff(model, weights)
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; ... {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise ModelError(
            file,
            f"weights do not fit the architecture ({len(diffs)} differences): {shown}",
            expected=f"a checkpoint of {cfg.name} with in_channels={plan.in_channels}, num_classes={plan.num_classes}",
        )
    model.load_state_dict(weights, strict=True)
    model.to(device).eval()
    # The config hash covers the plan as stored, so sidecars of earlier runs still match.
    return model, plan, ModelSource(str(file), sha256), {"config": dict(config), "plan": dict(raw_plan)}, defaults


def _infer_defaults(config: Mapping[str, Any], file: str) -> InferConfig:
    """A checkpoint's ``infer`` section (absent in checkpoints from before it existed: the defaults)."""
    from medgn.configtools import build

    try:
        return build(InferConfig, config.get("infer", {}), "infer")
    except UsageError as exc:
        raise ModelError(file, f"checkpoint config has bad inference defaults ({exc.one_line()})") from exc


def _plan_diff(a: Plan, b: Plan) -> list[str]:
    sa, sb = a.shared(), b.shared()
    return [
        f"{k}: {sa[k]!r} vs {sb[k]!r}"
        for k in sa
        if json.dumps(sa[k], sort_keys=True) != json.dumps(sb[k], sort_keys=True)
    ]


def load_predictor(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], device: str | torch.device = "cpu"
) -> Predictor:
    """Load one model or an ensemble of folds for inference.

    Args:
        paths: a run folder, checkpoint folder, pointer file or checkpoint file, or several of
            them (their softmax outputs are averaged); a folder holding several run folders
            (``fold_0``, ``fold_1``, ...) is the ensemble of all of them.
        device: where the networks run ("cpu", "cuda", "cuda:1").

    Returns:
        The :class:`Predictor` with every checkpoint's sha256 recorded.

    Raises:
        ModelError: a checkpoint is missing, corrupt, unsafe, incomplete, does not fit its
            architecture, holds NaN/Inf weights, or the plans of several models disagree (exit 4).
        UsageError: no model given or an unknown device (exit 2).
    """
    items = [
        run for item in ([paths] if isinstance(paths, (str, os.PathLike)) else list(paths)) for run in fold_runs(item)
    ]
    if not items:
        raise UsageError("--model", "no model given", expected="at least one run folder or checkpoint")
    dev = _device(device)
    models, sources, records, defaults = [], [], [], []
    plan0: Plan | None = None
    for item in items:
        model, plan, source, record, infer_defaults = _load_one(item, dev)
        if plan0 is None:
            plan0 = plan
        else:
            diffs = _plan_diff(plan0, plan)
            if diffs:
                raise ModelError(
                    source.path,
                    "models disagree on their plans: " + "; ".join(diffs),
                    expected=f"the plan of {sources[0].path}",
                )
        models.append(model)
        sources.append(source)
        records.append(record)
        defaults.append(infer_defaults)
    assert plan0 is not None  # items is non-empty
    return Predictor(models, plan0, sources, json_sha256(records), dev, merge_infer_defaults(defaults))


def fold_runs(path: str | os.PathLike[str]) -> list[str | os.PathLike[str]]:
    """The run folders inside ``path`` when it is a folder of runs (an ensemble), else ``[path]``."""
    folder = Path(path)
    if (
        not folder.is_dir()
        or (folder / "checkpoints").is_dir()
        or any(folder.glob("*.pt"))
        or any((folder / f"{name}.json").is_file() for name in POINTERS)  # a checkpoint folder's pointers
    ):
        return [path]
    runs = sorted(p for p in folder.iterdir() if p.is_dir() and (p / "checkpoints").is_dir())
    return list(runs) or [path]


def _device(device: str | torch.device) -> torch.device:
    from medgn.environment import resolve_device

    return resolve_device(device)
