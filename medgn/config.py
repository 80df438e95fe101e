"""The run configuration: one YAML file composed of the per-package sections.

A run config has the sections ``model`` (:class:`~medgn.models.config.UNet3DConfig`), ``data``
(:class:`~medgn.data.config.DataConfig`), ``plan`` (:class:`~medgn.planning.plan_config.PlanConfig`),
``train`` (:class:`~medgn.train.config.TrainConfig`) and ``infer``
(:class:`~medgn.infer.config.InferConfig`, the defaults ``medgn infer`` uses for the model).
:func:`load_run_config` reads the YAML, applies ``--set section.key=value`` overrides and
validates every key, so a typo fails naming the key and the valid choices;
:func:`write_resolved_config` saves the fully resolved copy (every default spelled out) next to the
run's outputs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medgn.configtools import apply_overrides, build, config_hash, dump_yaml, load_yaml, to_dict
from medgn.data.config import DataConfig
from medgn.files import atomic_write_text
from medgn.infer.config import InferConfig
from medgn.models.config import UNet3DConfig
from medgn.planning.plan_config import PlanConfig
from medgn.train.config import TrainConfig


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a training run."""

    model: UNet3DConfig = field(default_factory=UNet3DConfig)
    data: DataConfig = field(default_factory=DataConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-able)."""
        return to_dict(self)

    @property
    def hash(self) -> str:
        """sha256 of the canonical resolved config."""
        return config_hash(self)


def build_run_config(data: Mapping[str, Any] | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Validate a nested mapping (plus overrides) into a :class:`RunConfig`."""
    return build(RunConfig, apply_overrides(dict(data or {}), overrides))


def load_run_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a run config YAML (None: all defaults), apply ``--set`` overrides, validate."""
    data = load_yaml(path) if path is not None else {}
    return build_run_config(data, overrides)


def write_resolved_config(cfg: RunConfig, path: str | os.PathLike[str]) -> Path:
    """Write the resolved config as YAML (atomically); returns the path."""
    header = f"# resolved medgn run config (sha256 {cfg.hash[:16]})\n"
    text = header + dump_yaml(cfg.to_dict())
    return atomic_write_text(path, text)
