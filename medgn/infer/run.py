"""``infer``: segment one scan or a folder of scans, keeping every input's geometry exactly.

This module owns the run: checks that need no model (output folder writable and outside the input
tree, or one named mask file for a single case; inputs found, safe and distinct output names,
shard), the output lock, removal of
temporary files an interrupted run left, model loading, and the per-case loop that continues past
a bad case, skips a case whose sidecar proves the same inputs, models and settings, refuses to
replace other outputs without ``overwrite``, shows progress with per-case timing and writes
``report.json`` after every case. The per-case work is :func:`medgn.infer.case.run_case`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from medgn.data.inputs import declared_channel_names, find_inputs, missing_input
from medgn.data.preflight import MASK_SUFFIXES
from medgn.data.prepare import PIPELINE_VERSION
from medgn.errors import EXIT_BUG, InputDataError, LockedError, MedgnError, UsageError, printable
from medgn.files import TEMP_MARK, TEMP_ROOM, RunLock, fit_name, missing_folders, remove_empty_folders
from medgn.infer import postprocess
from medgn.infer.case import (
    OUTPUT_FORMATS,
    PROBABILITIES_SUFFIX,
    SEG_SUFFIX,
    changed_outputs,
    default_output_format,
    fingerprint,
    mask_suffix,
    output_state,
    outputs_exist,
    primary_suffix,
    read_inputs,
    read_sidecar,
    recorded_outputs,
    refuse_existing,
    run_case,
)
from medgn.infer.config import InferConfig
from medgn.infer.outputs import (
    CaseResult,
    InferenceReport,
    MaskFile,
    check_mask_file,
    check_output_dir,
    mask_file,
    output_names,
    parse_shard,
    report_name,
    select_shard,
)
from medgn.infer.postprocess import PostProcessing
from medgn.infer.predictor import Predictor, load_predictor
from medgn.infer.settings import InferSettings
from medgn.infer.sliding_window import WindowSettings, resolve_precision
from medgn.logs import get_logger
from medgn.planning.plan import Plan, channel_names, reordered

__all__ = ["InferSettings", "InferenceReport", "infer"]

log = get_logger(__name__)
# The plan values a sidecar records: enough to tell which preprocessing produced the mask.
SIDECAR_PLAN_KEYS = ("in_channels", "num_classes", "label_values", "target_spacing", "patch_size")
ModelSpec = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Predictor


def _pipeline(plan: Plan, limits: Any = None) -> tuple[Any, Any]:
    from medgn.data.preflight import DEFAULT_LIMITS
    from medgn.data.prepare import invert_probabilities, prepare

    def preprocess(paths: list[str], volumes: list[Any]) -> tuple[torch.Tensor, Any]:
        data = prepare(volumes, plan, limits or DEFAULT_LIMITS)
        return data.image, data

    return preprocess, invert_probabilities


def _clean_own_temps(output_dir: Path, names: Sequence[str], report_name: str | None) -> list[Path]:
    """Remove the temp files an interrupted run left for this run's own outputs, by exact name.

    Other runs may write into the same folder at the same time (shards, named mask files), so a
    temp file is this run's only when its final name is one of this run's outputs.
    """
    finals = {n + s for n in names for s in (*MASK_SUFFIXES, SEG_SUFFIX, ".json", PROBABILITIES_SUFFIX)}
    if report_name is not None:
        finals.add(report_name)
    removed = []
    tails = {fit_name(name, TEMP_ROOM) for name in finals}
    for path in output_dir.iterdir():
        # temp names are TEMP_MARK + 12 hex + "-" + the final name fitted (see medgn.files.atomic_path)
        if path.name.startswith(TEMP_MARK) and path.name[len(TEMP_MARK) + 13 :] in tails and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def resolve_mirroring(run: InferSettings, defaults: InferConfig) -> tuple[bool, tuple[int, ...]]:
    """Whether and over which axes a run mirrors: what it asks for, else what the models carry.

    Axes given without ``tta`` turn mirroring on (asking for axes means asking for mirroring);
    ``tta=False`` wins. The axes come back sorted, and as (0, 1, 2) when mirroring is off, so
    runs that compute the same thing record the same settings (and the same case fingerprints).
    """
    tta = run.tta if run.tta is not None else (run.mirror_axes is not None or defaults.tta)
    if not tta:
        return False, (0, 1, 2)
    axes = run.mirror_axes if run.mirror_axes is not None else defaults.mirror_axes
    return True, tuple(sorted(int(a) for a in axes))


def _settings(
    predictor: Predictor,
    tta: bool,
    overlap: float,
    sw_batch_size: int,
    mirror_axes: Sequence[int],
    precision: str = "auto",
) -> WindowSettings:
    patch = predictor.plan.patch_size
    return WindowSettings(
        roi_size=patch,
        overlap=float(overlap),
        sw_batch_size=int(sw_batch_size),
        tta=bool(tta),
        mirror_axes=tuple(int(a) for a in mirror_axes),
        precision=resolve_precision(predictor.device, precision),  # recorded as computed
    )  # type: ignore[arg-type]


def _progress(enabled: bool, total: int) -> Any:
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("[bold]infer"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
        console=Console(stderr=True),
    )
    progress.start()
    progress.add_task("", total=total)
    return progress


def infer(
    models: ModelSpec,
    input_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    settings: InferSettings | None = None,
    **changes: Any,
) -> InferenceReport:
    """Segment every case under ``input_path`` into ``output_dir``.

    Args:
        models: run folder(s) / checkpoint(s) (several = averaged folds), or a loaded
            :class:`Predictor`.
        input_path: an image file, a folder (``_0000``/``_0001`` channels), a dataset folder
            (its test list) or a DICOM series folder.
        output_dir: where masks, sidecars and ``report.json`` go; created; never inside the input.
            A path ending in ``.nii.gz``, ``.nii``, ``.nrrd`` or ``.mha`` (not an existing folder)
            names the mask of a single case instead: it is written there in that format, its
            sidecar beside it, and no ``report.json``.
        settings: device, sliding window, outputs, shard, channels (:class:`InferSettings`;
            defaults when None), recorded as-is in every sidecar.
        changes: individual settings replacing those of ``settings`` (``overlap=0.25``...).

    Returns:
        The per-case report (also written to ``report.json``); ``report.exit_code`` is non-zero
        when a case failed.

    Raises:
        UsageError: output folder unwritable or inside the input, colliding case names, bad shard.
        LockedError: another run holds the output folder (exit 6).
        ModelError: a model cannot be loaded (exit 4). All raised before any case is processed.
    """
    settings = InferSettings.of(settings, **changes)
    input_path = Path(input_path)
    created = missing_folders(Path(output_dir))  # made by this run: removed again if it is refused
    started, named = False, False
    try:
        with contextlib.ExitStack() as stack:
            if not input_path.is_file() and not input_path.is_dir():
                raise missing_input(input_path)
            target = mask_file(output_dir)
            if target is not None:
                created, named = missing_folders(target.folder), True
            out, shard_pair, lock = _claim_output(input_path, output_dir, target, settings, created)
            if shard_pair is not None:  # after its lock is released (last in, first out): an empty shard folder goes
                stack.callback(remove_empty_folders, [lock.folder])
            try:
                stack.enter_context(lock)  # at once: a refused run never removes a folder another run took
            except LockedError as exc:
                if target is None:
                    raise
                raise _mask_locked(out, target.stem, exc) from None
            cases = {c.case_id: c for c in find_inputs(input_path, names=settings.channels)}
            declared = declared_channel_names(input_path)  # a dataset folder's channel_names, or None
            if target is not None and len(cases) != 1:
                raise UsageError(
                    "--output",
                    f"names one mask file, but the input holds {len(cases)} cases",
                    got=str(output_dir),
                    expected="an output folder (one mask per case is written there)",
                )
            _check_output_format(settings.output_format, cases)
            selected = select_shard(list(cases), shard_pair)
            if target is None:
                suffixes = {cid: _volume_suffix(cases[cid].images[0], settings.output_format) for cid in selected}
                names = output_names(selected, suffixes, shard_pair)
            else:
                names = {selected[0]: target.stem}
            if target is None:  # a named mask's run holds its mask's lock already (_claim_output)
                for name in names.values():
                    stack.callback(_mask_lock(out, name).release)
            removed = _clean_own_temps(out, list(names.values()), None if target else report_name(shard_pair))
            if removed:
                log.info("removed %d temporary file(s) of an interrupted run in %s", len(removed), out)
            predictor = models if isinstance(models, Predictor) else load_predictor(models, settings.device)
            _check_channel_order(predictor, settings.channels, declared, input_path)
            started = True
            return _run_cases(predictor, cases, selected, names, out, shard_pair, settings, target)
    finally:
        # A refused run leaves no folder behind that it made (its lock is released by now), nor does a
        # named mask whose case failed; a folder run keeps its report.json.
        if not started or named:
            remove_empty_folders(created)


def _case_settings(recorded: dict[str, Any], images: tuple[Path, ...], output_format: str | None) -> dict[str, Any]:
    """The settings a case's fingerprint covers: an ``--output-format`` that writes what this input gets
    by default (``nifti`` for a ``.nii.gz`` scan, ``both`` for a DICOM series) is left out, so a rerun
    that names the default, or leaves it out, is the same run."""
    if output_format is None or "mask_suffix" in recorded:
        return recorded
    default = output_format == default_output_format(images)
    if default and _volume_suffix(images[0], output_format) == mask_suffix(images[0]):
        return {k: v for k, v in recorded.items() if k != "output_format"}
    return recorded


def _volume_suffix(first_channel: Path, output_format: str | None) -> str:
    """A folder run's mask format: NIfTI when ``--output-format nifti`` asks for it, else the input's own."""
    return ".nii.gz" if output_format == "nifti" else mask_suffix(first_channel)


def mask_lock_name(stem: str) -> str:
    """The lock file of one mask (and its sidecar) in an output folder, by the mask's name stem."""
    return f".medgn-{hashlib.sha256(stem.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}.lock"


def _mask_lock(out: Path, stem: str) -> RunLock:
    """Take the lock of one mask that a folder or shard run writes.

    With every case locked, a named-mask run, a shard or another folder run that writes the same mask
    into the same folder is refused (exit 6), whichever of them came second.
    """
    lock = RunLock(out, purpose=f"infer {stem}", name=mask_lock_name(stem))
    try:
        return lock.acquire()
    except LockedError as exc:
        raise _mask_locked(out, stem, exc) from None


def _mask_locked(out: Path, stem: str, exc: LockedError) -> LockedError:
    """The one message for a mask another run writes, whichever kind of run came first."""
    return LockedError(
        out,
        f"mask {printable(stem)} is being written by another medgn run",
        got=exc.got,
        expected="wait for it to finish, or write into another folder",
    )


def _claim_output(
    input_path: Path,
    output_dir: str | os.PathLike[str],
    target: MaskFile | None,
    settings: InferSettings,
    created: list[Path],
) -> tuple[Path, tuple[int, int] | None, RunLock]:
    """Check and create the output (folder, or a named mask's folder) and return the lock to take there.

    A shard's lock folder this run makes is added to ``created`` (deepest first).
    """
    if target is not None:
        if settings.shard is not None:
            raise UsageError(
                "--shard", "one named mask cannot be split into shards", got=settings.shard, expected="an output folder"
            )
        implied = parse_shard(None)  # torchrun's processes would each write the same mask
        if implied is not None and implied[1] > 1:
            raise UsageError(
                "RANK/WORLD_SIZE",
                f"one named mask cannot be split among {implied[1]} processes",
                got=f"process {implied[0]} of {implied[1]} (torchrun)",
                expected="one process for one scan, or an output folder",
            )
        if settings.output_format == "dicom-seg":
            raise UsageError(
                "--output-format",
                f"dicom-seg writes no {target.suffix} mask, but --output names one",
                got=settings.output_format,
                expected="an output folder for the DICOM-SEG alone, or --output-format both",
            )
        if settings.output_format == "nifti" and target.suffix.lower() not in (".nii.gz", ".nii"):
            raise UsageError(
                "--output-format",
                f"nifti writes a NIfTI mask, but --output names a {target.suffix} file",
                got=str(target.path),
                expected="a mask name ending in .nii.gz or .nii, or no --output-format (the name decides)",
            )
        out = check_mask_file(target, input_path)
        # The folder may hold other masks, and other runs writing them: lock this mask only.
        return out, None, RunLock(out, purpose=f"infer {target.path.name}", name=mask_lock_name(target.stem))
    shard_pair = parse_shard(settings.shard)
    out = check_output_dir(output_dir, input_path)
    if shard_pair is None:
        return out, None, RunLock(out, purpose="infer")
    # Shards share the folder: each locks its own subfolder, their cases are disjoint.
    shard_dir = out / f".medgn-shard-{shard_pair[0]}of{shard_pair[1]}"
    created[:0] = missing_folders(shard_dir)
    shard_dir.mkdir(exist_ok=True)
    return out, shard_pair, RunLock(shard_dir, purpose=f"infer shard {shard_pair[0]}/{shard_pair[1]}")


def _check_output_format(output_format: str | None, cases: dict[str, Any]) -> None:
    """Refuse an unknown format, or a DICOM-SEG for inputs that are not DICOM series (exit 2)."""
    if output_format is not None and output_format not in OUTPUT_FORMATS:
        raise UsageError(
            "--output-format", "unknown output format", got=output_format, expected=" or ".join(OUTPUT_FORMATS)
        )
    if output_format in ("dicom-seg", "both"):
        files = [c.case_id for c in cases.values() if not c.images[0].is_dir()]
        if files:
            raise UsageError(
                "--output-format",
                f"a DICOM-SEG needs a DICOM series input; not DICOM: {', '.join(files[:5])}",
                got=output_format,
                expected="--output-format nifti for NIfTI/NRRD/MHA inputs",
            )


def choose_postprocessing(predictor: Predictor, run: InferSettings) -> PostProcessing | None:
    """What inference applies to the class map: the models' own decision, or what the user asked.

    ``auto`` pools the ``postprocessing.json`` of every model's run folder (decided when it was
    trained); a model without one (a bare checkpoint, an older run) means no post-processing.
    ``lcc`` (or ``largest_component``) keeps the largest component of every class; ``none`` nothing.
    """
    classes = range(1, predictor.plan.num_classes)
    if run.largest_component or run.postprocess == "lcc":
        return PostProcessing({k: True for k in classes}, "requested (--postprocess lcc)")
    if run.postprocess == "none":
        return None
    decisions = [postprocess.PostProcessing.load(d) for d in predictor.run_dirs()]
    if not decisions or any(d is None for d in decisions):
        return None
    decision = postprocess.pooled([d for d in decisions if d is not None])
    return decision if any(decision.lcc.values()) else None


def _check_channel_order(
    predictor: Predictor, given: Sequence[str] | None, declared: Sequence[str] | None, input_path: Path
) -> None:
    """Refuse channels named in another order than the model's (wrong masks without a word).

    ``--channels`` or a dataset folder's ``channel_names`` that name the model's channels (as its
    plan records them) in another order would feed FLAIR where the model expects T1c.
    """
    model = channel_names(predictor.plan)
    for names, where, error in (
        (given, "--channels", UsageError),
        (declared, str(input_path / "dataset.json"), InputDataError),
    ):
        if names and reordered(model, names) is not None:
            raise error(
                where,
                f"names the model's channels in another order: {', '.join(names)}; the model was trained on "
                f"{', '.join(model)}",
                expected=(
                    f"--channels {','.join(model)}"
                    if error is UsageError
                    else "the model's order (channel_names and the _0000, _0001... files)"
                ),
            )


def _run_cases(
    predictor: Predictor,
    cases: dict[str, Any],
    selected: list[str],
    names: dict[str, str],
    out: Path,
    shard: tuple[int, int] | None,
    run: InferSettings,
    target: MaskFile | None = None,
) -> InferenceReport:
    from medgn.environment import versions

    k = predictor.plan.in_channels
    if run.channels is not None and len(run.channels) != k:  # before any case: every one would fail alike
        raise UsageError(
            "--channels",
            f"names {len(run.channels)} channel(s), the model takes {k}",
            got=",".join(run.channels),
            expected=f"{k} channel names, in the order the model was trained on",
        )
    tta, axes = resolve_mirroring(run, predictor.defaults)
    log.info("test-time mirroring: %s", f"axes {list(axes)} ({2 ** len(axes)} flips)" if tta else "off")
    settings = _settings(predictor, tta, run.overlap, run.sw_batch_size, axes, run.precision)
    # What determines a mask (the case fingerprint covers it). "inversion" came after the first
    # release: masks it wrote (probabilities interpolated as they are) are not taken for this run's;
    # nor are masks preprocessed with another meaning ("preprocessing", the pipeline version).
    recorded = {
        **asdict(settings),
        "save_probabilities": run.save_probabilities,
        # --largest-component and --postprocess lcc are one request (recorded as the first spelled it
        # before; a sidecar of that kind is still recognised, see `spelled`)
        "largest_component": run.largest_component or run.postprocess == "lcc",
        "label_values": predictor.label_values,
        "inversion": "log_probabilities",
        "preprocessing": PIPELINE_VERSION,
    }
    decision = choose_postprocessing(predictor, run)
    if decision is not None:  # it changes masks, so the fingerprint covers it
        recorded["postprocessing"] = decision.to_dict()
        log.info("post-processing: %s", decision.describe())
    options = {
        "overwrite": run.overwrite,
        "save_probabilities": run.save_probabilities,
        "postprocessing": decision,
        "threads": run.threads,
        "output_format": run.output_format,
        "limits": run.limits,
    }
    if run.output_format is not None:  # recorded only when chosen: default runs keep their fingerprints
        recorded["output_format"] = run.output_format
    # The settings as this run's options spelled them, which earlier versions recorded: a case done by
    # such a run is still this run's.
    spelled = {**recorded, "largest_component": run.largest_component}
    if target is not None and any(target.suffix.lower() != mask_suffix(cases[c].images[0]) for c in selected):
        recorded["mask_suffix"] = target.suffix.lower()  # another format than the input's own (the same otherwise)
    preprocess, invert = _pipeline(predictor.plan, run.limits)
    report = InferenceReport(
        out, shard=shard, models=[asdict(s) for s in predictor.sources], mask_file=target.path if target else None
    )
    threads = run.threads if run.threads is not None else torch.get_num_threads()  # --threads applies per case
    env = {"versions": versions(), "device": str(predictor.device), "torch_threads": threads}
    bar = _progress(run.progress, len(selected))
    try:
        for cid in selected:
            case, stem = cases[cid], out / names[cid]
            t0 = time.perf_counter()
            result = CaseResult(cid, names[cid], "ok")
            try:
                # A place kept for a channel the model does not take is gone from what was read.
                reads, inputs = read_inputs(case.images, predictor.plan.in_channels)
                images = tuple(Path(i["path"]) for i in inputs)
                case_settings = _case_settings(recorded, images, run.output_format)
                hashes = [r["sha256"] for r in inputs]
                fp = fingerprint(hashes, predictor.model_sha256s, predictor.config_hash, case_settings)
                suffix = target.suffix if target is not None else _volume_suffix(images[0], run.output_format)
                options["mask_suffix"] = suffix
                existing = outputs_exist(stem, suffix)
                sidecar = read_sidecar(stem.with_name(stem.name + ".json"))
                primary = stem.name + primary_suffix(images, run.output_format, suffix)  # a SEG, or the mask
                mask_done = (out / primary).is_file()
                same = sidecar is not None and (
                    sidecar.get("fingerprint") == fp
                    or sidecar.get("fingerprint")
                    == fingerprint(hashes, predictor.model_sha256s, predictor.config_hash, spelled)
                )
                state, telling = output_state(out, sidecar) if same else ("missing", [])
                # An interrupted run of the same fingerprint left these outputs, or a finished one some
                # of whose outputs were deleted since: ours to replace. One changed since it was written
                # (a mask corrected by hand, or damaged) is never replaced without --overwrite.
                resuming = same and (sidecar.get("status") == "running" or state == "missing")
                if same and sidecar.get("status") == "done" and mask_done and state == "intact":
                    result.status, result.message, result.outputs = (
                        "skipped",
                        "done earlier with the same inputs, models and settings",
                        [*sidecar.get("outputs", []), stem.name + ".json"],
                    )
                    result.warnings = list(sidecar.get("warnings", []))
                elif same and state in ("changed", "unproven") and not run.overwrite:
                    raise changed_outputs(stem, state, telling)
                elif existing and not (run.overwrite or resuming):
                    raise refuse_existing(stem, existing, sidecar, primary)
                else:
                    options["overwrite"] = bool(run.overwrite or resuming)
                    # What the earlier record of this same mask listed and this run may not write again
                    # (its probabilities, its DICOM-SEG): removed once this run has its own outputs.
                    options["stale_outputs"] = recorded_outputs(sidecar, stem.name, stem.name + suffix)
                    options["stale_sha256"] = dict(sidecar.get("output_sha256", {})) if sidecar else {}
                    base = {
                        "sidecar_version": 1,
                        "case_id": cid,
                        "inputs": inputs,
                        "fingerprint": fp,
                        "models": report.models,
                        "config_hash": predictor.config_hash,
                        "settings": case_settings,
                        "infer_settings": run.to_dict(),
                        "plan": {k: v for k, v in predictor.plan.to_dict().items() if k in SIDECAR_PLAN_KEYS},
                        **env,
                    }
                    outcome = run_case(images, stem, predictor, settings, options, preprocess, invert, base, reads)
                    result.outputs, result.warnings = outcome.outputs, outcome.warnings
            except MedgnError as exc:
                result.status, result.code, result.message = "failed", exc.code, exc.one_line()
                log.error("case %s failed: %s", cid, exc.one_line())
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # noqa: BLE001 - record the bug for this case, continue with the others
                result.status, result.code, result.message = (
                    "failed",
                    EXIT_BUG,
                    f"internal error: {type(exc).__name__}: {exc}",
                )
                log.error("case %s failed with an internal error:\n%s", cid, traceback.format_exc())
            result.seconds = round(time.perf_counter() - t0, 4)
            report.cases.append(result)
            report.write()
            log.info(
                "case %s: %s in %.2f s%s",
                cid,
                result.status,
                result.seconds,
                f" ({result.message})" if result.status == "failed" else "",
            )
            if bar is not None:
                bar.update(bar.task_ids[0], advance=1, description=f"{cid}: {result.status} {result.seconds:.1f} s")
    finally:
        if bar is not None:
            bar.stop()
    report.write()
    return report
