"""One training run on a dataset folder: verify, plan, split, build, train, validate, save.

:func:`train_on_dataset` is the Python API behind ``medgn train``. Rank 0 checks every case
first (the same check as ``medgn verify``; skipped on ``resume`` unless asked), taking the
fingerprint from that same pass when a plan has to be made, so each volume is read once there and
once more by the patch cache before the first step. It reads or makes the dataset plan (a typed
:class:`~medgn.planning.plan.Plan`), adapts it with the config's ``plan`` section, writes the resolved config, the
effective plan and the fold split into the run
folder, builds the network from the ``model`` section, and hands patches, validation and hooks to
the :class:`~medgn.train.trainer.Trainer`. The run folder is locked while training; ``resume``
continues from the last checkpoint exactly. Under ``torchrun`` every rank runs this function; rank 0
writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medgn.checkpoint import checkpoint_files, read_pointer
from medgn.config import RunConfig, write_resolved_config
from medgn.data.datasets import Case, load_dataset
from medgn.data.workload import VALIDATION_OVERLAP, check_dataset_workload
from medgn.environment import resolve_device
from medgn.errors import MedgnError, UsageError
from medgn.files import RunLock, atomic_write_json, clean_stale_temps, is_inside, make_output_dir
from medgn.infer import postprocess
from medgn.logs import attach_file_log, get_logger
from medgn.planning.plan import Plan, channel_names, reordered
from medgn.planning.plan_config import apply_plan_config
from medgn.train import distributed as ddp
from medgn.train.logging_hooks import default_hooks
from medgn.train.memory import check_training_memory
from medgn.train.patches import PatchDataset
from medgn.train.rng import seed_everything
from medgn.train.sampler import ResumableLoader, ResumableSampler
from medgn.train.state import TrainState
from medgn.train.trainer import Trainer
from medgn.train.validation import make_validator
from medgn.workflows.data_record import record_dataset
from medgn.workflows.resume import (
    ResumePoint,
    check_resumed_data,
    check_resumed_network,
    check_resumed_plan_network,
    check_resumed_settings,
    load_resume_point,
    record_resume,
    run_record,
)
from medgn.workflows.run_data import check_resumed_plan, dataset_plan, fold_cases, log_plan_changes, verify_cases
from medgn.workflows.run_folder import (
    DATASET_PLAN,
    RESOLVED_CONFIG,
    RUN_LOG,
    RUN_PLAN,
    check_resumed_fold,
    fold_name,
    remove_new_files,
    remove_new_run,
    write_run_record,
)

log = get_logger(__name__)

# (network, run folder, resuming) -> extra hooks; loads initial weights unless resuming (fine-tuning).
ModelInit = Callable[[torch.nn.Module, Path, bool], Sequence[Any]]


@dataclass
class TrainResult:
    """What a finished (or stopped) run did."""

    out_dir: Path
    state: TrainState
    exit_code: int
    best_dice: float | None
    records: list[dict[str, Any]]


def train_on_dataset(
    cfg: RunConfig,
    data: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    fold: int = 0,
    resume: bool = False,
    device: str = "cpu",
    plan_path: str | os.PathLike[str] | None = None,
    console: bool = True,
    init_model: ModelInit | None = None,
    verify: bool | None = None,
    allow_changed_settings: bool = False,
) -> TrainResult:
    """Train one fold of ``data`` into ``out_dir``.

    Args:
        cfg: the resolved run config.
        data: dataset folder (MSD, nnU-Net v2 raw, or images/ + labels/).
        out_dir: run folder (created); holds config.yaml, plan.json, splits.json, checkpoints/,
            metrics.jsonl, tensorboard/, progress.png and medgn.log.
        fold: cross-validation fold, or ``ALL_FOLDS`` to train on every case without validation.
        resume: continue from the run folder's latest checkpoint.
        device: "cpu" or "cuda" (under torchrun each rank takes ``cuda:LOCAL_RANK``).
        plan_path: a plan from ``medgn plan``; default: the run folder's, else one is made.
        console: live progress display.
        init_model: called with the freshly built network, the run folder and ``resume`` before
            training starts; loads initial weights (not on resume) and returns extra hooks.
        verify: check every case before training (rank 0); default: yes, except on ``resume``
            (the run was checked when it started).
        allow_changed_settings: on ``resume``, accept settings that change what training computes
            (listed as a warning and recorded in run.json); see :mod:`medgn.workflows.resume`.

    Raises:
        UsageError: bad options, an existing run without ``resume``, or a resume with another fold
            or with settings the resume policy refuses.
        InputDataError: the dataset fails verification (every problem listed in the log), or a
            resume on other data than the run's.
        ModelError: a damaged checkpoint, or a resume with another network.
    """
    started_at = time.monotonic()  # a time budget counts from here: verify, planning and caching included
    data, out_dir = Path(data), Path(out_dir)
    dev = resolve_device(device)  # plain cuda under torchrun: this rank's GPU
    info = ddp.init_distributed(dev.type)  # joins the process group under torchrun
    device = str(dev)
    if is_inside(out_dir, data):  # also out_dir == data
        raise UsageError(
            out_dir, "refusing to write the run into the dataset folder", expected="an --out outside the input tree"
        )
    if cfg.data.cache_dir is not None and is_inside(cfg.data.cache_dir, data):
        raise UsageError(
            "data.cache_dir",
            "refusing to write the cache into the dataset folder",
            got=cfg.data.cache_dir,
            expected="a folder outside the input tree",
        )
    # A pointer, or checkpoint files alone (latest.json lost): either way the folder holds a run.
    checkpoints = out_dir / "checkpoints"
    has_checkpoint = read_pointer(checkpoints) is not None or bool(checkpoint_files(checkpoints))
    if resume and not has_checkpoint:
        raise UsageError(
            out_dir, "nothing to resume: no checkpoint in the run folder", expected="a run folder with checkpoints/"
        )
    if not resume and has_checkpoint:
        raise UsageError(
            out_dir, "run folder already has checkpoints", expected="--resume to continue it, or a new --out"
        )
    created, training, keep = not out_dir.exists(), False, False
    before = {p.name for p in out_dir.iterdir()} if out_dir.is_dir() else set()  # what a user's folder held
    make_output_dir(out_dir, "run folder")
    lock = RunLock(out_dir, purpose="train") if info.is_main else None
    if lock is not None:
        lock.acquire()
    try:
        # A resume is checked before anything is written: its checkpoint, fold and settings.
        point = load_resume_point(out_dir) if resume else None
        done = _finished_run(out_dir, cfg) if resume else None
        changed: dict[str, tuple] = {}
        if point is not None:
            check_resumed_fold(out_dir, fold, point.run.get("fold"))
            if done is None:  # a finished run trains nothing: its settings cannot change anything
                changed = check_resumed_settings(cfg.to_dict(), point, out_dir, allow=allow_changed_settings)
        if info.is_main:
            attach_file_log(out_dir / RUN_LOG)
            clean_stale_temps(out_dir)
            if not resume:
                write_run_record(out_dir, fold)
        if done is not None:
            log.info("the run had finished at step %d; nothing to do", done.state.iteration)
            return done
        index = load_dataset(data)
        data_record = None
        if info.is_main:  # rank 0 verifies, plans and splits; the others read what it wrote
            if point is not None:  # the run's own cases, unchanged (exit 3 naming what differs)
                data_record = check_resumed_data(point, index, data, cfg.data.limits)
            given = Path(plan_path) if plan_path else None
            needs_plan = given is None and not (resume and (out_dir / DATASET_PLAN).exists())
            keep = True  # a dataset that fails verification keeps the log listing every problem
            report = (
                verify_cases(index, data, cfg, fingerprint=needs_plan, digests=data_record is None)
                if (verify if verify is not None else not resume)
                else None
            )
            keep = False
            if data_record is None:  # what a resume of this run will compare its data with
                data_record = record_dataset(index, read=report.sha256 if report is not None else None)
            base_plan = dataset_plan(index, cfg, out_dir, given, True, report, reuse=resume)
            fold_cases(index, cfg, out_dir, fold, given)
        ddp.barrier()
        if not info.is_main:
            base_plan = dataset_plan(index, cfg, out_dir, Path(plan_path) if plan_path else None, False)
        if base_plan.in_channels != len(index.channel_names):  # a --plan made for another dataset
            raise UsageError(
                plan_path or out_dir / DATASET_PLAN,
                f"the plan is for {base_plan.in_channels} input channel(s), the dataset has "
                f"{len(index.channel_names)} ({', '.join(index.channel_names)})",
                expected="a plan made from this dataset (medgn plan), or none",
            )
        if reordered(channel_names(base_plan), index.channel_names) is not None:  # its normalisations too
            raise UsageError(
                plan_path or out_dir / DATASET_PLAN,
                f"the plan names the dataset's channels in another order: {', '.join(channel_names(base_plan))}; "
                f"the dataset has {', '.join(index.channel_names)}",
                expected="a plan made from this dataset (medgn plan), or none",
            )
        plan, features = apply_plan_config(base_plan, cfg.plan, cfg.model.features)
        # The model learns the dataset it trains on: its plan describes that dataset (its channels,
        # which inference and fine-tuning check the order by, and its label names, which name the
        # DICOM-SEG segments), whatever dataset a --plan was made from.
        record = {
            **(plan.dataset or {}),
            "name": index.name,
            "format": index.format,
            "channel_names": list(index.channel_names),
            "modalities": list(index.modalities),
            # its label names where they name the plan's label values (else the plan's stay)
            **(
                {"labels": dict(index.labels), "regions": index.regions}
                if index.labels and sorted(index.labels.values()) == list(plan.label_values)
                else {}
            ),
        }
        if record != dict(plan.dataset or {}):
            plan = plan.replace(dataset=record)
        if info.is_main:
            log_plan_changes(base_plan, plan, "--plan" if plan_path else "the dataset's plan")
        # train.deep_supervision switches the extra heads off (both switches must be on to use them);
        # the resolved config then says what was built, so inference rebuilds the same network.
        deep = cfg.model.deep_supervision and cfg.train.deep_supervision
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, features=features, deep_supervision=deep))
        if point is not None:  # the run's own network and plan, checked before anything is written
            check_resumed_network(cfg.to_dict()["model"], point, out_dir)  # widths and heads
            if (out_dir / RUN_PLAN).is_file():
                check_resumed_plan(Plan.load(out_dir / RUN_PLAN), plan, out_dir)
            check_resumed_plan_network(plan.to_dict(), point, out_dir)  # stages, strides, kernel sizes
        # The plan is final: a run that cannot fit in memory stops here (exit 5), before its config and plan.
        check_training_memory(cfg, plan, fold_cases(index, cfg, out_dir, fold)[0], dev, warn=info.is_main)
        record = run_record(fold, data_record, point, changed)
        if info.is_main:
            if resume:  # accepted: run.json says what the checkpoints say (restored if lost)
                record_resume(out_dir, fold, point, changed)
            write_resolved_config(cfg, out_dir / RESOLVED_CONFIG)
            plan.save(out_dir / RUN_PLAN)
        train_cases, val_cases = fold_cases(index, cfg, out_dir, fold)
        # Before any resampling: a case that would explode at the plan's spacing stops the run (exit 5).
        check_dataset_workload(train_cases, plan.target_spacing, cfg.data.limits)
        check_dataset_workload(
            val_cases, plan.target_spacing, cfg.data.limits, roi=plan.patch_size, overlap=VALIDATION_OVERLAP
        )  # the validator's windows
        log.info(
            "fold %s: %d training and %d validation cases; patch %s at %s mm",
            fold_name(fold),
            len(train_cases),
            len(val_cases),
            plan.patch_size,
            plan.target_spacing,
        )
        training = True  # from here on the folder holds a run's record (logs, metrics, checkpoints)
        return _fit(
            cfg,
            plan,
            train_cases,
            val_cases,
            out_dir,
            device,
            resume,
            console,
            info,
            started_at,
            init_model,
            point,
            record,
        )
    except MedgnError:
        # A new run refused before training leaves no half-made folder (one process only: under
        # torchrun the other ranks may still be reading what rank 0 wrote).
        if not training and not keep and info.world_size == 1:
            if created:
                remove_new_run(out_dir, lock)
            elif not resume:  # a folder the user made: only what this run wrote into it goes
                remove_new_files(out_dir, before)
        raise
    finally:
        if lock is not None:
            lock.release()
        ddp.cleanup()


def _fit(
    cfg: RunConfig,
    plan: Plan,
    train_cases: list[Case],
    val_cases: list[Case],
    out_dir: Path,
    device: str,
    resume: bool,
    console: bool,
    info: Any,
    started_at: float,
    init_model: ModelInit | None = None,
    point: ResumePoint | None = None,
    record: dict[str, Any] | None = None,
) -> TrainResult:
    from medgn.models.registry import build_model

    tcfg = cfg.train
    dataset = PatchDataset(train_cases, plan, cfg.data)
    sampler = ResumableSampler(
        len(train_cases),
        tcfg.micro_batches_per_epoch * tcfg.batch_size,
        seed=tcfg.seed,
        rank=info.rank,
        world_size=info.world_size,
        with_seeds=True,
    )
    workers = cfg.data.num_workers
    loader = ResumableLoader(dataset, sampler, tcfg.batch_size, num_workers=workers, persistent_workers=False)
    evidence: dict[int, Any] = {}  # case index -> LCC evidence of the latest validation
    classes = range(1, plan.num_classes)

    def collect(i: int, pred: torch.Tensor, ref: torch.Tensor) -> None:
        evidence[i] = postprocess.lcc_evidence(pred.numpy(), ref.numpy(), classes)

    validate = make_validator(val_cases, plan, cfg.data, device, on_case=collect) if val_cases else None
    hooks = default_hooks(tcfg, out_dir, validate=validate, console=console, started_at=started_at)
    seed_everything(tcfg.seed + info.rank, deterministic=tcfg.deterministic)  # before weights are drawn
    model = build_model(cfg.model, plan.in_channels, plan.num_classes, plan.network.strides, plan.network.kernel_sizes)
    if init_model is not None:  # on resume it only restores hooks: the checkpoint has the weights
        hooks = [*hooks, *init_model(model, out_dir, resume)]
    trainer = Trainer(
        model,
        tcfg,
        loader,
        out_dir=out_dir,
        device=device,
        hooks=hooks,
        run_config=cfg.to_dict(),
        plan=plan.to_dict(),
        dist_info=info,
        run_record=record,
    )
    if resume:
        trainer.resume(point.file if point is not None else out_dir / "checkpoints", point.state if point else None)
    state = trainer.train()  # a run killed after its last step only runs its end: final validation and checkpoint
    best = _best(hooks)
    if info.is_main:
        if trainer.stop_signal is None:  # a run stopped by a signal decides at its real end, once resumed
            _choose_postprocessing(out_dir, evidence, dataset, classes)
        summary = {
            "stop_reason": state.stop_reason,
            "iteration": state.iteration,
            "planned_iters": trainer.total_iters,  # the schedule's length, fitted to a budget or not
            "schedule_fitted_to_budget": bool(state.planned_iters),
            "seconds": round(time.monotonic() - started_at, 1),
            "epoch": state.epoch,
            "best_val_ema_dice": best,
            "samples_seen": state.samples_seen,
            "nonfinite_skipped": state.nonfinite_total,
        }
        atomic_write_json(out_dir / "train_summary.json", json.loads(json.dumps(summary)))
    return TrainResult(out_dir, state, trainer.exit_code, best, list(trainer.epoch_records))


def _finished_run(out_dir: Path, cfg: RunConfig) -> TrainResult | None:
    """A run this resume has nothing to add to, or None.

    Finished means its summary says so, its final checkpoint and post-processing choice are there,
    and this config plans no more steps (a schedule fitted to a time budget keeps its length;
    without a budget, a larger ``train.epochs`` extends the run). Such a resume trains nothing and
    writes nothing: re-deciding post-processing without the validations that chose it, or a new
    final checkpoint of the same weights, would only change what inference does or take space. A
    run stopped before its end (a signal, the budget, a kill during the final validation) is not
    finished and resumes.
    """
    try:
        summary = json.loads((out_dir / "train_summary.json").read_text(encoding="utf-8"))
        done = int(summary["iteration"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    final = read_pointer(out_dir / "checkpoints", "final")
    if summary.get("stop_reason") != "finished" or final is None or int(final.get("iteration", -1)) != done:
        return None
    if not (out_dir / postprocess.FILE).is_file():
        return None
    # Without a budget the config's epochs decide (a larger train.epochs extends the run); summaries of
    # earlier versions record 0 there, and a fitted schedule's length otherwise.
    planned = int(summary.get("planned_iters") or 0) if summary.get("schedule_fitted_to_budget", True) else 0
    if done < (planned or cfg.train.total_iters):
        return None
    state = TrainState(epoch=int(summary.get("epoch", 0)), iteration=done)
    state.stop_reason = "already finished; nothing to do"
    return TrainResult(out_dir, state, 0, summary.get("best_val_ema_dice"), [])


def _best(hooks: Sequence[Any]) -> float | None:
    """The validation hook's best (smoothed) Dice, or None without validation."""
    for hook in hooks:
        if getattr(hook, "name", "") == "validation":
            return getattr(hook, "best", None)
    return None


def _choose_postprocessing(out_dir: Path, evidence: dict[int, Any], dataset: PatchDataset, classes: range) -> None:
    """Decide per class whether inference keeps only the largest component; write postprocessing.json.

    With validation cases: from the last validation's held-out predictions (with and without the
    filter). Trained on every case: from the reference labels' topology.
    """
    if evidence:
        decision = postprocess.decide([evidence[i] for i in sorted(evidence)])
    else:
        labels = (dataset.cache[i]["label"] for i in range(len(dataset)))
        decision = postprocess.decide_from_topology(
            [postprocess.topology_evidence(np.asarray(lab)[0], classes) for lab in labels]
        )
    atomic_write_json(out_dir / postprocess.FILE, decision.to_dict())
    log.info("post-processing: %s", decision.describe())
