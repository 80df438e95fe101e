"""The typed, frozen dataset plan: the contract between planning, training and inference.

This module owns :class:`Plan` (and its :class:`NetworkPlan`), the one reader and checker of plan
dicts. A plan is stored as JSON by ``medgn plan`` and in the run folder (``Plan.save`` /
``Plan.load``, atomic, same keys as before plus ``schema_version``; a file without
``schema_version`` is schema 1) and as a plain dict in every checkpoint (``Plan.to_dict`` /
``Plan.from_dict``, so checkpoints written before this class existed still load). Every required
key and every value is checked here once: a plan file raises :class:`~medgn.errors.InputDataError`
(exit 3), a checkpoint's plan :class:`~medgn.errors.ModelError` (exit 4), both naming the file and
the key.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from medgn.errors import InputDataError, MedgnError
from medgn.files import atomic_write_json, path_problem

# The JSON contract: "version" is the planner's rule set (1 since the first release),
# "schema_version" the layout of this file; both are 1 and a file without schema_version is 1.
PLAN_VERSION = 1
SCHEMA_VERSION = 1
# Keys a plan must have wherever it comes from (file or checkpoint); the rest have defaults.
REQUIRED_KEYS = ("in_channels", "num_classes", "target_spacing", "patch_size", "normalization")
# Voxels in one patch: far above what GPUs train (nnU-Net's largest patches are ~5M voxels); a
# larger value is a corrupt or hostile plan, and inference would allocate it for every window.
MAX_PATCH_VOXELS = 1 << 24  # 256^3
NORMALIZATION_SCHEMES = ("ct", "zscore", "none")
# Keys a fold ensemble must share: preprocessing and label mapping run once per case.
SHARED_KEYS = ("in_channels", "num_classes", "label_values", "target_spacing", "normalization", "patch_size")


@dataclass(frozen=True)
class NetworkPlan:
    """Per-stage strides and kernel sizes (and optionally feature widths) of the network."""

    strides: tuple[tuple[int, ...], ...] | None = None
    kernel_sizes: tuple[tuple[int, ...], ...] | None = None
    features: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; ``features`` only when set (older plans have none)."""
        out: dict[str, Any] = {"strides": _lists(self.strides), "kernel_sizes": _lists(self.kernel_sizes)}
        if self.features is not None:
            out["features"] = list(self.features)
        return out


@dataclass(frozen=True)
class Plan:
    """A dataset plan: what preprocessing, patch sampling and the network are built from.

    Attributes:
        in_channels: image channels per case.
        num_classes: classes including background.
        label_values: raw label value of class index i (length ``num_classes``).
        target_spacing: voxel size in mm (x, y, z) after resampling (RAS axes).
        normalization: one ``{"scheme": "ct"|"zscore", ...}`` per channel.
        patch_size: training patch and sliding-window size in voxels.
        batch_size: planned patches per step.
        network: strides, kernel sizes and feature widths per stage.
        dataset: name, format, channel names, modalities, labels, regions (from ``medgn plan``).
        memory: the GPU budget and estimate the patch was chosen with.
        median_resampled_shape: median case shape at ``target_spacing``.
        fingerprint: the dataset measurements the plan was derived from.
        version: the planner's rule-set version; schema_version: the layout of this record.
    """

    in_channels: int
    num_classes: int
    label_values: tuple[int, ...]
    target_spacing: tuple[float, float, float]
    normalization: tuple[Mapping[str, Any], ...]
    patch_size: tuple[int, int, int]
    batch_size: int = 2
    network: NetworkPlan = field(default_factory=NetworkPlan)
    dataset: Mapping[str, Any] | None = None
    memory: Mapping[str, Any] | None = None
    median_resampled_shape: tuple[float, ...] | None = None
    fingerprint: Mapping[str, Any] | None = None
    version: int = PLAN_VERSION
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_dict(
        cls, data: Any, source: str | os.PathLike[str] = "plan", *, error: type[MedgnError] = InputDataError
    ) -> Plan:
        """Check a plan dict (a file's JSON or a checkpoint's ``plan``) and build the Plan.

        Args:
            data: the dict.
            source: the file named in errors.
            error: the error class (InputDataError for plan files, ModelError for checkpoints).

        Raises:
            ``error``: not a dict, a missing key, a value of the wrong type or size, an
                unsupported version, or lengths that disagree (channels vs normalisations,
                classes vs label values).
        """
        if isinstance(data, Plan):
            return data
        if not isinstance(data, Mapping):
            raise error(
                source, "plan is not a JSON object", got=type(data).__name__, expected="a plan written by 'medgn plan'"
            )
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise error(
                source,
                f"plan misses key(s) {', '.join(missing)}",
                expected=f"keys {', '.join(REQUIRED_KEYS)} (a plan written by 'medgn plan')",
            )
        schema = _int(data, "schema_version", source, error, default=1)
        if schema != SCHEMA_VERSION:
            raise error(
                source,
                "unsupported plan schema_version",
                got=schema,
                expected=f"{SCHEMA_VERSION} (re-run 'medgn plan' with this medgn)",
            )
        version = _int(data, "version", source, error, default=PLAN_VERSION)
        if version != PLAN_VERSION:
            raise error(source, "unsupported plan version", got=version, expected=str(PLAN_VERSION))
        in_channels = _int(data, "in_channels", source, error, minimum=1)
        num_classes = _int(data, "num_classes", source, error, minimum=2)
        raw_values = data.get("label_values")
        label_values = (
            tuple(range(num_classes)) if raw_values is None else _ints(raw_values, "label_values", source, error)
        )
        if list(label_values) != sorted(set(label_values)) or not all(0 <= v <= 65535 for v in label_values):
            raise error(
                source,
                "plan key label_values is malformed",
                got=list(label_values),
                expected="distinct values 0..65535 in increasing order (masks are uint8 or uint16)",
            )
        if len(label_values) != num_classes:
            raise error(
                source,
                "plan key label_values does not match num_classes",
                got=list(label_values),
                expected=f"{num_classes} values",
            )
        norms = data["normalization"]
        if (
            not isinstance(norms, Sequence)
            or isinstance(norms, str)
            or not all(isinstance(n, Mapping) and "scheme" in n for n in norms)
        ):
            raise error(
                source, "plan key normalization is malformed", got=norms, expected='one {"scheme": ...} per channel'
            )
        for i, norm in enumerate(norms):
            problem = _normalization_problem(norm)
            if problem:
                raise error(
                    source,
                    f"plan key normalization[{i}] is malformed ({problem})",
                    got=dict(norm),
                    expected='{"scheme": "zscore"}, {"scheme": "none"} or '
                    '{"scheme": "ct", "clip": [lo, hi], "mean": m, "std": s}',
                )
        if len(norms) != in_channels:
            raise error(
                source,
                "plan key normalization does not match in_channels",
                got=f"{len(norms)} normalisations",
                expected=f"{in_channels} (one per channel)",
            )
        network = data.get("network") or {}
        if not isinstance(network, Mapping):
            raise error(source, "plan key network is malformed", got=network, expected="{strides, kernel_sizes}")
        patch_size = _triple(data, "patch_size", int, source, error)
        if math.prod(patch_size) > MAX_PATCH_VOXELS:
            raise error(
                source,
                "plan key patch_size is too large",
                got=list(patch_size),
                expected=f"<= {MAX_PATCH_VOXELS} voxels",
            )
        dataset = data.get("dataset")
        if dataset is not None and not isinstance(dataset, Mapping):
            raise error(source, "plan key dataset is malformed", got=dataset, expected="a JSON object")
        try:
            median = data.get("median_resampled_shape")
            median_shape = None if median is None else tuple(float(v) for v in median)
        except (TypeError, ValueError):
            raise error(
                source, "plan key median_resampled_shape is malformed", got=median, expected="3 numbers"
            ) from None
        return cls(
            in_channels=in_channels,
            num_classes=num_classes,
            label_values=label_values,
            target_spacing=_triple(data, "target_spacing", float, source, error),  # type: ignore[arg-type]
            normalization=tuple(dict(n) for n in norms),
            patch_size=patch_size,  # type: ignore[arg-type]
            batch_size=_int(data, "batch_size", source, error, default=2, minimum=1),
            network=NetworkPlan(
                strides=_stages(network.get("strides"), "network.strides", source, error),
                kernel_sizes=_stages(network.get("kernel_sizes"), "network.kernel_sizes", source, error),
                features=None
                if network.get("features") is None
                else _ints(network["features"], "network.features", source, error),
            ),
            dataset=dataset,
            memory=data.get("memory"),
            median_resampled_shape=median_shape,
            fingerprint=data.get("fingerprint"),
            version=version,
            schema_version=schema,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout (key order as ``medgn plan`` has always written it, plus schema_version)."""
        out: dict[str, Any] = {"version": self.version, "schema_version": self.schema_version}
        if self.dataset is not None:
            out["dataset"] = _plain(self.dataset)
        out.update(
            label_values=list(self.label_values),
            num_classes=self.num_classes,
            in_channels=self.in_channels,
            target_spacing=list(self.target_spacing),
            normalization=[_plain(n) for n in self.normalization],
            patch_size=list(self.patch_size),
            batch_size=self.batch_size,
            network=self.network.to_dict(),
        )
        if self.memory is not None:
            out["memory"] = _plain(self.memory)
        if self.median_resampled_shape is not None:
            out["median_resampled_shape"] = list(self.median_resampled_shape)
        if self.fingerprint is not None:
            out["fingerprint"] = _plain(self.fingerprint)
        return out

    def shared(self) -> dict[str, Any]:
        """The values every model of an ensemble must agree on (see ``SHARED_KEYS``)."""
        full = self.to_dict()
        return {k: full[k] for k in SHARED_KEYS}

    def replace(self, **changes: Any) -> Plan:
        """A copy with some fields changed (the plan is frozen)."""
        return replace(self, **changes)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        """Read and check a plan JSON file.

        Raises:
            InputDataError: missing or unreadable file, or a bad plan (exit 3, naming the file).
        """
        path = Path(path)
        problem = path_problem(path)
        if problem not in (None, "not found") or path.is_dir():  # a FIFO would block the read
            raise InputDataError(path, f"plan file is {problem or 'a folder'}", expected="the output of 'medgn plan'")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputDataError(path, "plan file not found", expected="the output of 'medgn plan'") from None
        except (OSError, ValueError) as exc:
            raise InputDataError(path, f"cannot read plan ({exc})") from None
        return cls.from_dict(data, path)

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = True) -> Path:
        """Write the plan as JSON atomically (never half-written)."""
        return atomic_write_json(path, self.to_dict(), overwrite=overwrite)


def channel_names(plan: Plan | Mapping[str, Any]) -> tuple[str, ...]:
    """The channel names a plan (or a checkpoint's plan dict) records; () when it records none."""
    dataset = plan.dataset if isinstance(plan, Plan) else plan.get("dataset")
    names = (dataset or {}).get("channel_names") if isinstance(dataset, Mapping) else None
    return tuple(str(n) for n in names) if isinstance(names, (list, tuple)) else ()


def reordered(model: Sequence[str], given: Sequence[str]) -> list[int] | None:
    """Where each of ``given``'s channels sits in ``model``'s order, when ``given`` names the same
    distinct channels in another order (T1c, FLAIR or t1c, flair for a model of FLAIR, T1c; case
    does not count); else None (the same order, other names, or names that cannot say: repeated or
    missing)."""
    model, given = [str(n).casefold() for n in model], [str(n).casefold() for n in given]  # t1c is T1c
    if len(set(model)) != len(model) or sorted(model) != sorted(given) or model == given:
        return None
    return [model.index(n) for n in given]


def _plain(obj: Any) -> Any:
    """A JSON round-trip copy: tuples become lists, mappings dicts (what a file would hold)."""
    return json.loads(json.dumps(obj))


def _lists(stages: tuple[tuple[int, ...], ...] | None) -> list[list[int]] | None:
    return None if stages is None else [list(s) for s in stages]


def _int(
    data: Mapping[str, Any],
    key: str,
    source: Any,
    error: type[MedgnError],
    *,
    default: int | None = None,
    minimum: int | None = None,
) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
        raise error(source, f"plan key {key} is not an integer", got=value)
    if minimum is not None and value < minimum:
        raise error(source, f"plan key {key} is out of range", got=value, expected=f">= {minimum}")
    return int(value)


def _ints(values: Any, key: str, source: Any, error: type[MedgnError]) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise error(source, f"plan key {key} is not a list of integers", got=values) from None


def _triple(data: Mapping[str, Any], key: str, kind: type, source: Any, error: type[MedgnError]) -> tuple[Any, ...]:
    values = data[key]
    try:
        out = tuple(kind(v) for v in values)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or not all(math.isfinite(v) and v > 0 for v in out):
        raise error(source, f"plan key {key} is malformed", got=values, expected="3 positive finite numbers (x, y, z)")
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _normalization_problem(norm: Mapping[str, Any]) -> str:
    """What is wrong with one channel's normalisation ("" when nothing)."""
    scheme = norm.get("scheme")
    if scheme not in NORMALIZATION_SCHEMES:
        return f"unknown scheme {scheme!r}"
    if scheme != "ct":
        return ""
    clip = norm.get("clip")
    if not isinstance(clip, Sequence) or isinstance(clip, str) or len(clip) != 2 or not all(map(_finite, clip)):
        return "'clip' must be two finite numbers"
    if clip[0] > clip[1]:
        return "'clip' must be [low, high]"
    if not _finite(norm.get("mean")) or not _finite(norm.get("std")) or norm["std"] < 0:
        return "'mean' and 'std' must be finite numbers, std >= 0"
    return ""


def _stages(values: Any, key: str, source: Any, error: type[MedgnError]) -> tuple[tuple[int, ...], ...] | None:
    if values is None:
        return None
    try:
        return tuple(tuple(int(v) for v in stage) for stage in values)
    except (TypeError, ValueError):
        raise error(source, f"plan key {key} is malformed", got=values, expected="one [x, y, z] per stage") from None
