"""Evaluation of a folder of predicted label maps against a folder of reference label maps.

This module owns :func:`evaluate`, the Python API behind ``medgn evaluate``: it matches cases by
file name (case id = name without ``.nii.gz``/``.nii``/``.nrrd``/``.mha``), or takes one
prediction file and one reference file as a single case named after the reference, refuses a missing
prediction unless asked to count it as failed, checks that prediction and reference share their
geometry (header first, before any voxel is read), computes per-case, per-class metrics
(:mod:`medgn.evaluate.metrics`) and summarises them. A case whose files are unreadable or no
regular files (a dangling link, a FIFO, a folder named like a case), whose labels are negative or
not integers, or whose geometry differs is reported as failed and the run goes on; the result then
carries exit code 3.
When an output folder is given, the run holds its lock and writes the reports
(:mod:`medgn.evaluate.report`) and figures (:mod:`medgn.evaluate.figures`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medgn.errors import InputDataError, MedgnError, ResourceError, UsageError, disk_full
from medgn.evaluate.figures import find_image
from medgn.evaluate.metrics import (
    FLAG_BOTH_EMPTY,
    FLAG_FAILED,
    FLAG_MISSING,
    ClassMetrics,
    Segments,
    absent_metrics,
    case_metrics,
    failed_metrics,
)
from medgn.evaluate.predictions import read_prediction
from medgn.evaluate.results import (  # noqa: F401
    CASE_SUFFIXES,
    REFERENCE_SUFFIXES,
    EvaluationResult,
    MetricRow,
    case_id,
    list_cases,
)
from medgn.files import TEMP_MARK, RunLock, clean_stale_temps, fsync_dir, is_inside, make_output_dir, path_problem
from medgn.logs import get_logger, warn_user

OUTPUT_FILES: tuple[str, ...] = ("metrics.csv", "summary.json", "report.md", "boxplot.png")

log = get_logger("evaluate.run")


def _check_labels(labels: Sequence[int] | None) -> tuple[int, ...] | None:
    if labels is None:
        return None
    values = tuple(int(v) for v in labels)
    if not values or any(v <= 0 for v in values) or len(set(values)) != len(values):
        raise UsageError(
            "--labels",
            "labels must be distinct positive integers",
            got=list(labels),
            expected="e.g. 1,2,3 (0 is background)",
        )
    return values


def _check_regions(regions: Mapping[str, Sequence[int]] | None) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for name, members in (regions or {}).items():
        try:
            values = tuple(int(v) for v in members)
        except (TypeError, ValueError):
            raise UsageError("--region", f"region {name!r} must list integer labels", got=members) from None
        if not name.strip() or name.strip().isdigit() or not name.isprintable():
            raise UsageError("--region", "region names must be printable words, not label numbers", got=name)
        if not values or any(v <= 0 for v in values):
            raise UsageError("--region", f"region {name!r} needs positive labels", got=list(members))
        out[name] = values
    return out


def _check_out_dir(out_dir: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    for folder in inputs:
        if is_inside(out_dir, folder):
            raise UsageError(
                out_dir,
                "output folder is inside an input folder",
                got=str(folder),
                expected="a folder outside the prediction, reference and image folders",
            )
    # Without summary.json (written last) the files are what a stopped run left: replaced.
    if not overwrite and (out_dir / "summary.json").exists():
        existing = [name for name in OUTPUT_FILES if (out_dir / name).exists()]
        if existing:
            raise UsageError(
                out_dir,
                "output folder already holds evaluation results",
                got=", ".join(existing),
                expected="a new folder, or --overwrite",
            )


def _pair(pred: Path, ref: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """One prediction file and one reference file as a single case, named after the reference."""
    if not (pred.is_file() and ref.is_file()):
        odd, file = (pred, ref) if not pred.is_file() else (ref, pred)
        if odd.is_dir():
            problem, got = "a folder, but the other of --pred/--ref is a file", f"{file} is a file"
        else:
            problem, got = path_problem(odd) or "not found", None
        raise UsageError(odd, problem, got=got, expected="two folders (cases matched by name) or two label files")
    for path in (pred, ref):
        if case_id(path.name) is None:
            raise UsageError(path, "not a label volume", expected=f"a file ending in {', '.join(CASE_SUFFIXES)}")
    cid = str(case_id(ref.name))
    return {cid: ref}, {cid: pred}


def _check_readable(path: Path, role: str) -> None:
    """Refuse a case file that is not a regular file, naming what it is (reading a FIFO would block)."""
    if not path.is_file():
        problem = path_problem(path) or "a folder"
        raise InputDataError(path, f"{role} is not a label file: {problem}", expected="a regular file")


def _check_not_negative(array: np.ndarray, path: Path) -> None:
    """Refuse label values below 0 (0 is background, foreground labels are positive)."""
    negative = array < 0
    if negative.any():
        raise InputDataError(
            path,
            f"label has {int(negative.sum())} voxels with negative values",
            got=f"values like {np.unique(array[negative])[:5].tolist()}",
            expected="label values >= 0 (0 is background)",
        )


# Largest |cos| between two voxel axes taken as perpendicular (0.006 degrees; float32 headers
# are far below it, a gantry tilt of 1 degree far above).
SHEAR_TOL = 1e-4


def _check_perpendicular(affine: np.ndarray, path: Path) -> None:
    """Refuse a sheared voxel grid: distances in mm are computed along perpendicular axes."""
    axes = np.asarray(affine, dtype=np.float64)[:3, :3]
    unit = axes / np.linalg.norm(axes, axis=0)
    cos = np.abs(unit.T @ unit - np.eye(3)).max()
    if cos > SHEAR_TOL:
        raise InputDataError(
            path,
            "voxel axes are not perpendicular (a sheared grid, as from a gantry tilt): surface distances in mm "
            "would be wrong",
            got=f"axes {float(np.degrees(np.arcsin(min(cos, 1.0)))):.3g} degrees off perpendicular",
            expected="a reference on a grid with perpendicular axes (resample it first)",
        )


def _evaluate_case(
    pred_path: Path,
    ref_path: Path,
    labels: tuple[int, ...] | None,
    regions: dict[str, tuple[int, ...]],
    tol: float,
    declared: tuple[int, ...] | None = None,
) -> dict[str, ClassMetrics]:
    from medgn.data.io import read_volume

    _check_readable(ref_path, "reference")
    _check_readable(pred_path, "prediction")
    if ref_path.name.lower().endswith(".seg.dcm"):
        raise InputDataError(
            ref_path,
            "a DICOM-SEG cannot be a reference: it has no voxel grid of its own to score on",
            expected=f"the reference as a label volume ({', '.join(REFERENCE_SUFFIXES)})",
        )
    ref = read_volume(ref_path, label=True)
    _check_not_negative(ref.array, ref_path)
    _check_perpendicular(ref.affine, ref_path)
    pred = read_prediction(pred_path, ref)
    _check_not_negative(pred.array, pred_path)
    scored = pred.meta.get("segments", pred.array)  # overlapping DICOM-SEG segments: each whole
    found = scored.present() if isinstance(scored, Segments) else np.unique(pred.array)
    ref_values = np.unique(ref.array) if declared is not None or labels is None else None  # read once, if needed
    if declared is not None:
        for what, path, values in (("reference", ref_path, ref_values), ("prediction", pred_path, found)):
            stray = sorted({int(v) for v in values} - {0, *declared})
            if stray:
                raise InputDataError(
                    path,
                    f"{what} holds label values the dataset does not declare",
                    got=stray[:10],
                    expected=f"values in {sorted({0, *declared})} (its dataset.json labels)",
                )
    present = labels
    if present is None:  # every foreground value found in either map
        present = tuple(int(v) for v in np.union1d(found, ref_values) if v > 0)
    return case_metrics(scored, ref.array, ref.spacing, present, regions, tol)


def evaluate(
    pred_dir: str | os.PathLike[str],
    ref_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    labels: Sequence[int] | None = None,
    nsd_tolerance_mm: float = 2.0,
    allow_missing: bool = False,
    image_dir: str | os.PathLike[str] | None = None,
    regions: Mapping[str, Sequence[int]] | None = None,
    worst_k: int = 3,
    *,
    overwrite: bool = False,
    only_predicted: bool = False,
    declared_labels: Sequence[int] | None = None,
    label_names: Mapping[int, str] | None = None,
) -> EvaluationResult:
    """Compare predicted label maps with reference label maps, case by case and class by class.

    Args:
        pred_dir: folder of predictions, one file per case, named like the references; or one
            prediction file when ``ref_dir`` is one reference file (a single case).
        ref_dir: folder of reference label maps; every case here is evaluated. Or one file.
        out_dir: where to write ``metrics.csv``, ``summary.json``, ``report.md``, ``boxplot.png``
            and ``overlays/``; None computes without writing. It is created if needed and locked
            while the run writes.
        labels: the foreground labels to evaluate; None means every nonzero value found in any
            prediction or reference. A label absent from both maps of a case scores as both empty
            there (Dice 1, distances 0) when some other case holds it; a label (or region) in no
            reference and no prediction of any evaluated case is not scored: its rows are NaN,
            flagged ``absent``, listed in ``result.absent``, and the per-class and overall
            statistics leave it out (as nnU-Net and MONAI do for a class without voxels).
        nsd_tolerance_mm: normalized surface Dice tolerance in mm.
        allow_missing: count a missing prediction as failed (Dice 0, infinite distances) instead of
            refusing the run.
        image_dir: optional folder of images (``<case>.nii.gz`` or ``<case>_0000.nii.gz``) under
            the overlay contours, or the image file of a single case; without it the reference
            is drawn underneath.
        regions: named unions of labels evaluated as one structure, e.g. ``{"whole_tumour": (1, 2, 3, 4)}``.
        worst_k: how many of the worst cases per label get overlay images.
        overwrite: replace earlier results in ``out_dir``.
        only_predicted: evaluate only the reference cases that have a prediction (a test subset
            scored against a folder of every label); the others are counted as not predicted.
        declared_labels: the label values a dataset declares (its dataset.json); a case whose
            reference or prediction holds another value fails, naming it, instead of being scored
            (or leaving a stray value out unseen).
        label_names: label value -> name (its dataset.json's), shown beside the number in the
            printed table, ``report.md``, ``summary.json`` and the figures.

    Returns:
        The rows, the summary and the failures; ``result.exit_code`` is 3 when any case failed: an
        unreadable file, a reference or prediction that is no regular file (a dangling link, a FIFO,
        a folder named like a case), a negative or non-integer label, a malformed DICOM-SEG, or a
        geometry that differs.

    Raises:
        UsageError: a folder is missing, bad labels, regions or tolerance, output inside an input.
        InputDataError: no reference cases, or predictions missing without ``allow_missing``.
        LockedError: another run writes into ``out_dir``.
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    label_set = _check_labels(labels)
    region_map = _check_regions(regions)
    if not (isinstance(nsd_tolerance_mm, (int, float)) and np.isfinite(nsd_tolerance_mm) and nsd_tolerance_mm >= 0):
        raise UsageError("--nsd-tolerance-mm", "must be a finite number of mm >= 0", got=nsd_tolerance_mm)
    if worst_k < 0:
        raise UsageError("--worst-k", "must be >= 0", got=worst_k)
    single = pred_dir.is_file() or ref_dir.is_file()
    refs, preds = _pair(pred_dir, ref_dir) if single else (list_cases(ref_dir), list_cases(pred_dir))
    if not refs:
        raise InputDataError(
            ref_dir, "no reference volumes found", expected=f"files ending in {', '.join(REFERENCE_SUFFIXES)}"
        )
    not_predicted: list[str] = []
    if only_predicted:
        if allow_missing:
            raise UsageError("--only-predicted", "cannot be combined with --allow-missing", expected="one of the two")
        not_predicted = sorted(set(refs) - set(preds))
        refs = {cid: path for cid, path in refs.items() if cid in preds} or refs  # none: refused below
    # A reference that is no readable file fails its case, prediction or not: not "missing".
    unreadable = {cid for cid, path in refs.items() if not path.is_file()}
    missing = sorted(set(refs) - set(preds) - unreadable)
    if len(missing) == len(refs) and (preds or allow_missing or only_predicted):  # a wrong folder
        channel = [cid for cid in preds if cid.endswith("_0000") and cid[: -len("_0000")] in refs]
        hint = (
            f"; predictions are named like images ({channel[0]}): a mask is named after its case, without "
            "the _0000 channel suffix"
            if channel
            else ""
        )
        raise InputDataError(
            pred_dir,
            f"no prediction is named like a reference case ({len(preds)} predictions, {len(refs)} references){hint}",
            expected=f"files named like those in {ref_dir}",
        )
    if missing and not allow_missing:
        shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise InputDataError(
            pred_dir,
            f"{len(missing)} of {len(refs)} predictions missing: {shown}",
            expected="a prediction per reference case, --only-predicted, or --allow-missing",
        )
    extra = sorted(set(preds) - set(refs))
    if extra:
        more = f" and {len(extra) - 20} more" if len(extra) > 20 else ""
        warn_user(f"{len(extra)} prediction(s) have no reference and are ignored: {', '.join(extra[:20])}{more}", log)
    out_path = Path(out_dir) if out_dir is not None else None
    images = Path(image_dir) if image_dir is not None else None
    if images is not None and not (images.is_dir() or (single and images.is_file())):
        problem = path_problem(images) or ("a file, but --pred and --ref are folders" if not single else "a folder")
        raise UsageError(
            images,
            ("image file does not exist" if single else "image folder does not exist")
            if problem == "not found"
            else f"--images: {problem}",
            expected="a folder of images named like the references" if not single else "the case's image file",
        )
    if images is not None and images.is_dir() and not any(find_image(images, cid) for cid in refs):
        raise UsageError(
            images,
            "no image named like any reference case (overlays would be drawn over the reference)",
            got=f"e.g. reference {next(iter(refs))}",
            expected="<case>.nii.gz or <case>_0000.nii.gz (or .nrrd, .mha...) for the reference cases",
        )
    with contextlib.ExitStack() as stack:
        if out_path is not None:
            inputs = [p for p in (pred_dir, ref_dir, images) if p is not None]
            _check_out_dir(out_path, inputs, overwrite)
            make_output_dir(out_path)
            stack.enter_context(RunLock(out_path, purpose="evaluate"))
            _check_out_dir(out_path, inputs, overwrite)  # again under the lock: a run may just have finished
            clean_stale_temps(out_path)
        return _run(
            pred_dir,
            ref_dir,
            out_path,
            images,
            refs,
            preds,
            missing,
            len(extra),
            label_set,
            region_map,
            float(nsd_tolerance_mm),
            allow_missing,
            worst_k,
            not_predicted if only_predicted else None,
            tuple(int(v) for v in declared_labels) if declared_labels is not None else None,
            {str(int(v)): str(n) for v, n in (label_names or {}).items() if int(v) != 0},
        )


def _run(
    pred_dir: Path,
    ref_dir: Path,
    out_path: Path | None,
    images: Path | None,
    refs: Mapping[str, Path],
    preds: Mapping[str, Path],
    missing: list[str],
    n_extra: int,
    label_set: tuple[int, ...] | None,
    region_map: dict[str, tuple[int, ...]],
    nsd_tolerance_mm: float,
    allow_missing: bool,
    worst_k: int,
    not_predicted: Sequence[str] | None = None,  # with --only-predicted: the references left out
    declared: tuple[int, ...] | None = None,
    label_names: dict[str, str] | None = None,
) -> EvaluationResult:
    """Evaluate every case, summarise, and write the outputs (the caller holds the lock)."""
    from medgn.evaluate.report import build_summary

    per_case: dict[str, dict[str, ClassMetrics]] = {}
    failures: dict[str, str] = {}
    for cid, ref_path in refs.items():
        if cid in missing:
            continue
        try:
            if cid not in preds:  # a reference that is not a readable file (see evaluate)
                _check_readable(ref_path, "reference")
            per_case[cid] = _evaluate_case(preds[cid], ref_path, label_set, region_map, nsd_tolerance_mm, declared)
        except MedgnError as exc:
            failures[cid] = exc.one_line()
            log.info("case %s failed: %s", cid, exc.one_line())  # the caller reports it
    final_labels = label_set
    if final_labels is None:
        final_labels = tuple(sorted({int(k) for res in per_case.values() for k in res if k.isdigit()}))
    keys = [str(v) for v in final_labels] + list(region_map)
    # A structure no evaluated case holds in either map cannot be scored (NaN, left out of the means).
    absent = [
        k for k in keys if per_case and all(FLAG_BOTH_EMPTY in _metrics(res, k).flags for res in per_case.values())
    ]
    rows = _rows(refs, per_case, failures, missing, keys, absent)
    result = EvaluationResult(
        rows=rows,
        summary={},
        failures=failures,
        missing=missing,
        labels=final_labels,
        regions=region_map,
        cases=list(refs),
        absent=absent,
        label_names={k: v for k, v in (label_names or {}).items() if k in keys},
    )
    settings = {
        "pred_dir": str(pred_dir),
        "ref_dir": str(ref_dir),
        "image_dir": str(images) if images else None,
        "labels": list(final_labels),
        "regions": {k: list(v) for k, v in region_map.items()},
        "nsd_tolerance_mm": nsd_tolerance_mm,
        "allow_missing": allow_missing,
        "only_predicted": not_predicted is not None,
    }
    result.summary = build_summary(
        result, settings, n_unmatched=n_extra, worst_k=worst_k, n_not_predicted=len(not_predicted or ())
    )
    if out_path is not None:
        _write(result, out_path, refs, preds, images, worst_k)
    return result


_BOTH_EMPTY = ClassMetrics(dice=1.0, iou=1.0, hd95=0.0, assd=0.0, nsd=1.0, flags=(FLAG_BOTH_EMPTY,))


def _metrics(case: Mapping[str, ClassMetrics], key: str) -> ClassMetrics:
    """A structure's metrics in one evaluated case; a label found only in other cases is in neither map here."""
    return case.get(key, _BOTH_EMPTY)


def _rows(
    refs: Mapping[str, Path],
    per_case: Mapping[str, Mapping[str, ClassMetrics]],
    failures: Mapping[str, str],
    missing: Sequence[str],
    keys: Sequence[str],
    absent: Sequence[str],
) -> list[MetricRow]:
    """One row per case and structure: missing, failed, absent (NaN) or the case's metrics."""
    rows = []
    for cid in refs:
        for key in keys:
            if cid in missing:
                metrics = failed_metrics(FLAG_MISSING)
            elif cid in failures:
                metrics = failed_metrics(FLAG_FAILED)
            elif key in absent:
                metrics = absent_metrics()
            else:
                metrics = _metrics(per_case[cid], key)
            rows.append(MetricRow(cid, key, metrics))
    return rows


def _write(
    result: EvaluationResult,
    out_dir: Path,
    refs: Mapping[str, Path],
    preds: Mapping[str, Path],
    images: Path | None,
    worst_k: int,
) -> None:
    """Write the outputs as one set: all in a temporary folder inside ``out_dir``, then moved into place
    with ``summary.json`` last. A run stopped or out of disk space before that leaves the earlier
    results as they were; ``summary.json`` (removed first when the set is replaced) marks a finished
    evaluation."""
    from medgn.evaluate.figures import write_boxplot, write_overlays
    from medgn.evaluate.report import write_outputs

    stage = Path(tempfile.mkdtemp(prefix=TEMP_MARK, suffix="-evaluation", dir=out_dir))
    try:
        figures = [write_boxplot(result, stage / "boxplot.png")]
        figures += write_overlays(result, stage / "overlays", refs, preds, images, worst_k)
        shown = [f.relative_to(stage) for f in figures]
        names = [f.relative_to(stage) for f in write_outputs(result, stage, shown)] + shown
        _publish(stage, out_dir, names)
    except OSError as exc:
        if disk_full(exc):
            raise ResourceError(out_dir, "no space left on device while writing", expected="free disk space") from exc
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    result.out_dir = out_dir
    result.files = [out_dir / name for name in names]


def _publish(stage: Path, out_dir: Path, names: Sequence[Path]) -> None:
    """Move the staged outputs into ``out_dir``, replacing an earlier evaluation's, summary last."""
    summary = Path("summary.json")
    (out_dir / summary).unlink(missing_ok=True)  # from here on the folder holds no finished evaluation
    # --overwrite: an earlier evaluation's overlays would pass for this one's worst cases
    for stale in (out_dir / "overlays").glob("*_label-*.png"):
        stale.unlink()
    for name in sorted(names, key=lambda n: n == summary):
        (out_dir / name).parent.mkdir(exist_ok=True)
        os.replace(stage / name, out_dir / name)
    fsync_dir(out_dir)
