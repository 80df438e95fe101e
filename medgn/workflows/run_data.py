"""What a training run trains on: the checked dataset, the plan it starts from, the fold's cases.

:func:`verify_cases` checks every case (the check of ``medgn verify``) and can take the fingerprint
statistics in the same pass; :func:`dataset_plan` is the plan a run starts from (``--plan``, the run
folder's, or one made from the data); :func:`check_resumed_plan` holds a resume to its run's plan;
:func:`fold_cases` reads or writes the run's ``splits.json`` and returns the fold's training and
validation cases; :func:`log_plan_changes` names what the config's ``plan`` section changed.
:func:`medgn.workflows.train.train_on_dataset` calls them in that order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medgn.config import RunConfig
from medgn.data.datasets import Case
from medgn.data.verify import verify_dataset
from medgn.errors import InputDataError, UsageError
from medgn.files import atomic_write_json
from medgn.logs import get_logger, warn_user
from medgn.planning.plan import Plan
from medgn.planning.splits import ALL_FOLDS, SPLITS_FILE, load_or_create_splits, make_splits
from medgn.workflows.run_folder import DATASET_PLAN, RUN_PLAN

log = get_logger(__name__)

__all__ = ["FINGERPRINT_SEED", "check_resumed_plan", "dataset_plan", "fold_cases", "log_plan_changes", "verify_cases"]

FINGERPRINT_SEED = 0  # the intensity sampling of a plan made by training (as `medgn plan`'s default)


def verify_cases(index: Any, data: Path, cfg: RunConfig, fingerprint: bool, digests: bool = False) -> Any:
    """Check every case (all problems logged); with ``fingerprint`` also take the statistics, with
    ``digests`` each file's sha256 (for the run's dataset record, without reading the files again)."""
    seed = FINGERPRINT_SEED if fingerprint else None
    report = verify_dataset(index, cfg.data.limits, stats_seed=seed, digests=digests)
    if not report.ok:
        for problem in report.problems:
            log.error("verify: %s", problem)
        first = report.problems[0]
        raise InputDataError(
            data,
            f"dataset failed verification with {len(report.problems)} problem(s); first: {first}",
            expected="a clean 'medgn verify' (see medgn.log for all problems)",
        )
    return report


def dataset_plan(
    index: Any,
    cfg: RunConfig,
    out_dir: Path,
    plan_path: Path | None,
    is_main: bool,
    report: Any = None,
    reuse: bool = True,
) -> Plan:
    """The plan the run starts from: ``--plan``, else the one stored in the run folder (``reuse``: a
    resume, or a rank reading what rank 0 wrote), else one made from the data. A new run never takes
    a stored plan: one left by an earlier refused run into the same folder may be another dataset's."""
    from medgn.planning.fingerprint import aggregate_fingerprint, compute_fingerprint
    from medgn.planning.planner import make_plan

    stored = out_dir / DATASET_PLAN
    if plan_path is not None:
        given = Plan.load(plan_path)
        if is_main and not reuse and Path(plan_path).resolve() != stored.resolve():
            given.save(stored)  # a new run's starting plan: a --resume without --plan finds it here
        return given
    if reuse and stored.exists():
        return Plan.load(stored)
    stats = report.stats if report is not None else None
    if stats is not None:  # verification already read every case: no second pass
        fingerprint = aggregate_fingerprint(index, stats)
    else:
        log.info("no plan given: fingerprinting %d cases", len(index.cases))
        fingerprint = compute_fingerprint(index, cfg.data.limits, seed=FINGERPRINT_SEED)
    plan = make_plan(index, fingerprint, gpu_memory_gb=cfg.plan.gpu_memory_gb)
    if is_main:
        plan.save(stored)
    return plan


def check_resumed_plan(stored: Plan, plan: Plan, out_dir: Path) -> None:
    """A resume trains with the run's own plan: its checkpoints were trained on that grid and patch."""
    a, b = stored.to_dict(), plan.to_dict()
    # Another network: the checkpoint's weights say so (exit 4). The dataset record: the data check
    # compares the run's cases (a plan may name the channels now where an older run's did not).
    keys = sorted((set(a) | set(b)) - {"network", "dataset"})
    diffs = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
    if diffs:
        raise UsageError(
            out_dir / RUN_PLAN,
            "the resumed run would train with another plan than its own",
            got="; ".join(diffs)[:300],
            expected="the run's --plan and plan.* settings, or a new --out",
        )


def fold_cases(
    index: Any, cfg: RunConfig, out_dir: Path, fold: int, plan_path: Path | None = None
) -> tuple[list[Case], list[Case]]:
    """The fold's (training, validation) cases from the run's splits.json.

    A run without one takes the folds ``medgn plan --folds/--seed`` wrote next to ``plan_path``
    (checked against the dataset, then copied into the run folder), else makes them from
    ``plan.n_folds`` and ``plan.split_seed``.
    """
    by_id = {c.case_id: c for c in index.cases}
    if fold == ALL_FOLDS:
        return list(index.cases), []
    n_folds = min(cfg.plan.n_folds, len(index.cases))
    if len(index.cases) < 2:
        raise InputDataError(
            index.root,
            "cross-validation needs at least 2 labelled cases",
            got=len(index.cases),
            expected="more cases, or --fold all",
        )
    run_splits = out_dir / SPLITS_FILE
    planned = plan_path.parent / SPLITS_FILE if plan_path is not None else None
    recorded = run_splits.exists()
    if recorded or (planned is not None and planned.is_file()):
        source = run_splits if recorded else planned
        advice = (
            "a --out of its own for a run on another dataset"
            if recorded
            else "a --plan made from this dataset ('medgn plan DATASET --out FOLDER/plan.json')"
        )
        splits = load_or_create_splits(source, sorted(by_id), other_dataset=advice)  # type: ignore[arg-type]
        n_folds = len(splits)
    else:
        splits = make_splits(sorted(by_id), n_folds, cfg.plan.split_seed)
        if n_folds < cfg.plan.n_folds:  # said once: the folds are written to splits.json below
            warn_user(
                f"plan.n_folds is {cfg.plan.n_folds} but the dataset has {len(by_id)} cases: {n_folds} folds "
                f"(0..{n_folds - 1}), one case each held out",
                log,
            )
    if not 0 <= fold < n_folds:
        raise UsageError("--fold", "fold out of range", got=fold, expected=f"0..{n_folds - 1} or 'all'")
    if not recorded:  # the run folder records the folds it trained on (the plan's, or new ones)
        atomic_write_json(run_splits, splits, overwrite=False)
    return [by_id[i] for i in splits[fold]["train"]], [by_id[i] for i in splits[fold]["val"]]


def log_plan_changes(base: Plan, plan: Plan, source: str) -> None:
    """Name in the log what the config's ``plan`` section changed in the plan the run was given."""
    changes = [
        f"{name} {list(before)} -> {list(after)}"
        for name, before, after in (
            ("target_spacing", base.target_spacing, plan.target_spacing),
            ("patch_size", base.patch_size, plan.patch_size),
            ("stages", [len(base.network.strides or ())], [len(plan.network.strides or ())]),
        )
        if tuple(before) != tuple(after)
    ]
    if changes:
        log.info("the run config (its plan section, model.features) changes %s: %s", source, "; ".join(changes))
