"""What ``medgn train --resume`` must match before it continues a run, checked before anything is written.

A resume continues the run exactly, so this module refuses what would not: :func:`load_resume_point`
reads the checkpoint once (the latest; without a ``latest.json``, the newest intact file; a damaged
one names the intact one before it), :func:`check_resumed_settings` compares the run config with
the checkpoint's, and :func:`check_resumed_data` compares the dataset with the record of its files
the checkpoint holds (:mod:`medgn.workflows.data_record`).

The settings policy: what only extends or observes the run may change (:data:`MAY_CHANGE`:
``train.epochs``, the time budget, validation, checkpoint and logging cadence, model selection,
workers, caching, size limits, memory layout, inference defaults). What changes the computation
(optimiser settings, learning rate and schedule, batch, seed, loss, precision, augmentation and
sampling) is refused listing each key ``old -> new`` (exit 2) unless ``--allow-changed-settings``
is given; then the list is shown as a warning and recorded. Some settings cannot change at all:
the optimiser (its state would not fit another), the split (``splits.json`` holds it) and the
network (the weights belong to it: exit 4), whether ``model.*`` settings or the plan's stages,
strides and kernel sizes (:func:`check_resumed_plan_network`) would change it. The plan's other
settings are checked by the plan they make (``medgn.workflows.train``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medgn.checkpoint import newest_intact_checkpoint, read_checkpoint, read_pointer
from medgn.data.datasets import DatasetIndex
from medgn.errors import InputDataError, ModelError, UsageError
from medgn.logs import get_logger, warn_user
from medgn.planning.splits import ALL_FOLDS
from medgn.workflows.data_record import dataset_changes, record_dataset, valid_record
from medgn.workflows.run_folder import RESOLVED_CONFIG, RUN_PLAN, read_run_record, write_run_record

log = get_logger(__name__)

# Settings a resume may change: they extend the run, observe it or say how it runs, never what a
# step computes.
MAY_CHANGE = frozenset(
    {
        "train.epochs",
        "train.time_budget_minutes",
        "train.fit_schedule_to_budget",
        "train.budget_probe_steps",
        "train.val_every",
        "train.ema_alpha",
        "train.early_stopping_patience",
        "train.checkpoint_every_minutes",
        "train.checkpoint_every_steps",
        "train.keep_checkpoints",
        "train.log_every",
        "train.max_nonfinite_in_row",
        "train.deterministic",
        "train.memory_check",
        "data.num_workers",
        "data.cache_dir",
        "data.cache_rate",
        "data.samples_per_volume",  # not used by the trainer
        "model.memory_format",
        "model.checkpoint",
    }
)
MAY_CHANGE_SECTIONS = ("data.limits.", "infer.")
# Checked by the plan they make (the run trains on its own plan), not as settings.
BY_PLAN = frozenset({"plan.gpu_memory_gb", "plan.target_spacing", "plan.patch_size", "plan.max_stages"})
# Resolved from the plan before the network is built: compared once resolved (check_resumed_network).
RESOLVED = frozenset({"model.features", "model.deep_supervision"})
# Never changed by a resume, even with --allow-changed-settings (why, for the message).
FIXED = {
    "train.optimizer": "the checkpoint's optimiser state belongs to its optimiser",
    "plan.n_folds": "the run's folds are in its splits.json",
    "plan.split_seed": "the run's folds are in its splits.json",
}
ALLOW_FLAG = "--allow-changed-settings"
# The plan's network keys that decide the weights' shapes (the widths are model.features, in RESOLVED).
PLAN_NETWORK = ("network.strides", "network.kernel_sizes")


@dataclass
class ResumePoint:
    """The checkpoint a resume continues from, read once."""

    state: dict[str, Any]
    file: Path

    @property
    def run(self) -> Mapping[str, Any]:
        """The run record stored in the checkpoint (fold, dataset record); empty for older ones."""
        run = self.state.get("run")
        return run if isinstance(run, Mapping) else {}

    @property
    def config(self) -> Mapping[str, Any]:
        config = self.state.get("config")
        return config if isinstance(config, Mapping) else {}

    @property
    def iteration(self) -> int:
        return int((self.state.get("counters") or {}).get("iteration", 0))


def load_resume_point(out_dir: Path) -> ResumePoint:
    """The checkpoint ``checkpoints/latest.json`` names, verified and loaded on the CPU.

    Without ``latest.json`` (lost or removed), the newest checkpoint file whose sha256 matches its
    ``.sha256`` file, with a warning.

    Raises:
        UsageError: no checkpoint at all (exit 2).
        ModelError: a damaged checkpoint (exit 4); the message names the newest intact one, if any,
            and how to resume from it.
    """
    folder = out_dir / "checkpoints"
    record = read_pointer(folder, "latest")  # a malformed pointer: ModelError naming it
    if record is None:
        intact = newest_intact_checkpoint(folder)
        if intact is None:
            raise UsageError(
                out_dir,
                "nothing to resume: no intact checkpoint in the run folder (checkpoints/latest.json is missing)",
                expected="a run folder with checkpoints/, or a new --out",
            )
        warn_user(
            f"{folder / 'latest.json'} is missing: resuming from the newest intact checkpoint, {intact.name}", log
        )
        state, file, _ = read_checkpoint(intact, map_location="cpu")
        return ResumePoint(state, file)
    try:
        state, file, _ = read_checkpoint(folder, map_location="cpu")
    except ModelError as exc:
        intact = newest_intact_checkpoint(folder, exclude=[record["file"]])
        if intact is None:
            raise
        hint = (
            f"; the earlier checkpoint {intact.name} is intact: remove {folder / 'latest.json'} to resume "
            "from it (the newest intact checkpoint)"
        )
        raise ModelError(exc.where, exc.what + hint, got=exc.got, expected=exc.expected) from exc
    return ResumePoint(state, file)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}`` (lists and tuples as JSON lists)."""
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.loads(json.dumps(tree, default=str))}


def _may_change(key: str) -> bool:
    return key in MAY_CHANGE or key.startswith(MAY_CHANGE_SECTIONS)


def _changes(old: Mapping[str, Any], new: Mapping[str, Any], keys: Iterable[str] | None = None) -> dict[str, tuple]:
    """Keys whose values differ: ``{key: (old, new)}``. Keys only one side knows (a setting added or
    removed by another medgn version) are not compared: the run used that version's behaviour."""
    a, b = _flatten(old), _flatten(new)
    wanted = set(a) & set(b) if keys is None else set(keys) & set(a) & set(b)
    return {k: (a[k], b[k]) for k in sorted(wanted) if a[k] != b[k]}


def describe(changes: Mapping[str, tuple]) -> str:
    """``train.lr 0.01 -> 0.5; train.seed 0 -> 7``."""
    return "; ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())


def _network_error(point: ResumePoint, changes: Mapping[str, tuple], out_dir: Path) -> ModelError:
    """Another network than the checkpoint's from the settings: most often a resume without the run's
    own ``--config``/``--set`` (the defaults then make another network), so the hint says to repeat them."""
    record = out_dir / RESOLVED_CONFIG
    return ModelError(
        point.file,
        f"the checkpoint does not fit this run's network ({describe(changes)[:300]})",
        expected=f"the model settings the run was started with: repeat its --config and --set options on --resume "
        f"({record} records them: --config {record} resumes with them), or a new --out",
    )


def _resolved_changes(stored: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, tuple]:
    """The network settings resolved from the plan, compared as far as the config alone tells.

    The heads exactly (``model.deep_supervision`` and ``train.deep_supervision`` both on). The widths
    are cut to the plan's stages, so widths whose first stages differ from the checkpoint's give
    another network for sure; the rest waits for the plan (:func:`check_resumed_network`).
    """
    old, new = stored.get("model") or {}, config.get("model") or {}
    changes: dict[str, tuple] = {}
    old_features, new_features = old.get("features"), new.get("features")
    if isinstance(old_features, (list, tuple)) and isinstance(new_features, (list, tuple)):
        if list(new_features[: len(old_features)]) != list(old_features):
            changes["model.features"] = (list(old_features), list(new_features))
    heads = bool(new.get("deep_supervision")) and bool((config.get("train") or {}).get("deep_supervision"))
    if isinstance(old.get("deep_supervision"), bool) and old["deep_supervision"] != heads:
        changes["model.deep_supervision"] = (old["deep_supervision"], heads)
    return changes


def check_resumed_settings(config: Mapping[str, Any], point: ResumePoint, out_dir: Path, *, allow: bool) -> dict:
    """Compare the run config (as a dict) with the checkpoint's under the policy above.

    Returns:
        The accepted changes that alter the computation (only with ``allow``): ``{key: (old, new)}``.
        Changes that may happen are logged.

    Raises:
        UsageError: a change the policy refuses (exit 2), listing each key old -> new.
        ModelError: another network (exit 4).
    """
    stored = point.config
    if not stored:
        log.warning("the checkpoint records no run config: the resume's settings are not compared")
        return {}
    changes = {k: v for k, v in _changes(stored, config).items() if k not in BY_PLAN | RESOLVED}
    network = {k: v for k, v in changes.items() if k.startswith("model.") and not _may_change(k)}
    network.update(_resolved_changes(stored, config))
    if network:
        raise _network_error(point, network, out_dir)
    fixed = {k: v for k, v in changes.items() if k in FIXED}
    if fixed:
        key = next(iter(fixed))
        raise UsageError(
            key,
            f"a resume cannot change it ({describe(fixed)}): {FIXED[key]}",
            expected=f"{key}={fixed[key][0]!r} to resume {out_dir}, or a new --out (--init-from {out_dir} "
            "starts a new run from its weights)",
        )
    free = {k: v for k, v in changes.items() if _may_change(k)}
    math = {k: v for k, v in changes.items() if k not in free}
    if free:
        log.info("resume: settings changed that extend or observe the run: %s", describe(free))
    if math and not allow:
        raise UsageError(
            out_dir / "config.yaml",
            f"the resume would change {len(math)} setting(s) that decide what training computes: {describe(math)}",
            expected="the run's own settings (train.epochs, the time budget, validation, checkpoint and logging "
            f"cadence may change), {ALLOW_FLAG} to continue with these anyway, or a new --out",
        )
    if math:
        warn_user(f"resuming at step {point.iteration} with changed settings ({ALLOW_FLAG}): {describe(math)}", log)
    return math


def check_resumed_network(model: Mapping[str, Any], point: ResumePoint, out_dir: Path) -> None:
    """The network resolved from the run's plan (widths, deep supervision) is the checkpoint's.

    Raises:
        ModelError: another network (exit 4), naming the settings.
    """
    stored = point.config.get("model")
    if isinstance(stored, Mapping):
        changes = _changes({"model": stored}, {"model": model}, keys=RESOLVED)
        if changes:
            raise _network_error(point, changes, out_dir)


def check_resumed_plan_network(plan: Mapping[str, Any], point: ResumePoint, out_dir: Path) -> None:
    """The plan's network (stages, strides, kernel sizes) is the one the checkpoint was trained with.

    Args:
        plan: the run's final plan, as ``Plan.to_dict``.

    Raises:
        ModelError: another network (exit 4), naming each difference ``old -> new``.
    """
    old, new = point.state.get("plan"), plan.get("network")
    old = old.get("network") if isinstance(old, Mapping) else None
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return  # a checkpoint without a plan (not written by medgn train): its weights are the check
    changes = {}
    old_strides, new_strides = old.get("strides") or [], new.get("strides") or []
    if len(old_strides) != len(new_strides):
        changes["network.stages"] = (len(old_strides), len(new_strides))
    changes.update(_changes({"network": old}, {"network": new}, keys=PLAN_NETWORK))
    if changes:
        raise ModelError(
            point.file,
            f"the checkpoint does not fit the network of this run's plan ({describe(changes)[:300]})",
            expected=f"the run's own plan ({out_dir / RUN_PLAN}: its --plan, or no --plan on --resume), or a new --out",
        )


def check_resumed_data(point: ResumePoint, index: DatasetIndex, data: Path, limits: Any) -> dict[str, Any]:
    """The dataset is the one the run started with; returns its record for the next checkpoints.

    A checkpoint from before the record (an older medgn) is not compared: a warning, and the record
    is taken now.

    Raises:
        InputDataError: cases added, removed or changed (exit 3), named; a changed case that no
            longer passes verification is reported with its problem.
    """
    from medgn.data.verify import verify_case

    stored = point.run.get("data")
    if not valid_record(stored):
        warn_user(
            "the run's checkpoint records no dataset fingerprint (an older medgn): the data are not compared "
            "with the run's; checkpoints record it from now on",
            log,
        )
        return record_dataset(index)
    current, changes = dataset_changes(stored, index)
    if not changes:
        return current
    by_id = {c.case_id: c for c in index.cases}
    for cid in changes.changed:  # a file that went bad says so (a truncated file, a stray label value)
        problems = verify_case(by_id[cid], index, limits).problems
        if problems:
            raise InputDataError(
                data,
                f"case {cid} changed since the run started and fails verification: {problems[0]}",
                expected="the dataset the run started with, unchanged",
            )
    raise InputDataError(
        data,
        f"the dataset is not the one the run trained on: {changes.describe()}",
        expected="the run's own dataset, unchanged (a resume continues on the same cases), or a new --out",
    )


def _change_entry(point: ResumePoint, changed: dict[str, tuple]) -> dict[str, Any]:
    """The record of one resume's accepted changes: the step it resumed at and each key's [old, new]."""
    return {"iteration": point.iteration, "changes": {k: list(v) for k, v in changed.items()}}


def run_record(
    fold: int, data_record: dict[str, Any] | None, point: ResumePoint | None, changed: dict[str, tuple]
) -> dict[str, Any]:
    """What every checkpoint records for a resume to match: the fold, the dataset's files, and the
    settings earlier resumes changed (with --allow-changed-settings) at which step."""
    history = list(point.run.get("changed_settings") or []) if point is not None else []
    if changed and point is not None:
        history.append(_change_entry(point, changed))
    record: dict[str, Any] = {"fold": "all" if fold == ALL_FOLDS else fold, "data": data_record}
    if history:
        record["changed_settings"] = history
    return record


def record_resume(out_dir: Path, fold: int, point: ResumePoint | None, changed: dict[str, tuple]) -> None:
    """An accepted resume: run.json restored when it was lost, and the settings it changed added."""
    record = read_run_record(out_dir)  # checked with the fold before: valid or absent
    if record is not None and not changed:
        return
    extra = {k: v for k, v in (record or {}).items() if k != "fold"}
    if changed and point is not None:
        extra["changed_settings"] = [*(extra.get("changed_settings") or []), _change_entry(point, changed)]
        # Warned of on stderr when accepted, before the run's medgn.log was attached: recorded there too.
        log.warning("resumed at step %d with changed settings: %s", point.iteration, describe(changed))
    write_run_record(out_dir, fold, **extra)
