"""Dataset integrity check: every case read and compared before a long training starts.

This module owns :func:`verify_dataset` and its :class:`VerifyReport`. For each case it checks that
the files exist, passes the header preflight, reads the pixels (NaN/Inf voxels, integer labels within
the declared set), with a plan's spacing the size each image becomes once resampled, and
compares the geometry of every channel and of the label with the first
channel (shape, spacing, origin, direction). Given a sampling seed it also takes each case's
fingerprint statistics (:mod:`medgn.data.case_stats`) from the volumes it holds, so training reads
every file once for both the check and the fingerprint. It never stops at the first problem: every
problem of every case is collected with its file, so ``medgn verify`` can list them all at once.

Across the training labels it checks which classes appear (:func:`label_coverage`): no foreground
in any label is a problem (there is nothing to learn), a class declared in ``dataset.json`` that no
label holds is a warning (nnU-Net accepts it too, but that class can only score Dice 0), shown on
stderr by ``medgn verify`` and ``medgn train``. Region-based labels and nnU-Net's ``ignore`` label
are refused (:func:`medgn.data.datasets.refuse_unsupported_labels`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medgn.data.case_stats import CaseStats, case_statistics
from medgn.data.datasets import Case, DatasetIndex, missing_original, refuse_unsupported_labels
from medgn.data.io import Limits, Volume, geometry_diff, read_volume
from medgn.data.multichannel import read_channels
from medgn.data.preflight import DEFAULT_LIMITS
from medgn.data.workload import check_workload
from medgn.errors import InputDataError, MedgnError
from medgn.logs import get_logger, warn_user

log = get_logger(__name__)


def _warn(message: str) -> None:
    warn_user(message, log)


@dataclass
class CaseResult:
    """The outcome for one case: problems (failing) and notes (safe, reported)."""

    case_id: str
    shape: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    labels_found: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stats: CaseStats | None = None
    sha256: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the case has no problem."""
        return not self.problems


@dataclass
class VerifyReport:
    """Results of :func:`verify_dataset`, one per case in dataset order.

    Attributes:
        index: the dataset checked.
        cases: one result per case (training cases first, then test cases when checked).
        dataset_problems: problems of the dataset as a whole (no foreground in any training label).
        warnings: what deserves a look but does not fail (a declared class in no training label).
    """

    index: DatasetIndex
    cases: list[CaseResult]
    dataset_problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no case and not the dataset as a whole has a problem."""
        return all(c.ok for c in self.cases) and not self.dataset_problems

    @property
    def problems(self) -> list[str]:
        """Every problem of every case, each naming its file, then those of the dataset as a whole."""
        return [p for c in self.cases for p in c.problems] + self.dataset_problems

    @property
    def sha256(self) -> dict[str, str]:
        """sha256 of each file's own bytes by its path as the dataset lists it, when taken (``digests``)."""
        return {path: digest for c in self.cases for path, digest in c.sha256.items()}

    @property
    def stats(self) -> list[CaseStats] | None:
        """Fingerprint statistics of the training cases, when taken and every case passed."""
        train_ids = {c.case_id for c in self.index.cases}
        stats = [c.stats for c in self.cases if c.case_id in train_ids]
        return None if not self.ok or any(s is None for s in stats) else stats  # type: ignore[return-value]


def _read(path: Path, limits: Limits, result: CaseResult, digest: bool, **kwargs: object) -> Volume | None:
    try:
        vol = read_volume(path, limits, digest=digest, **kwargs)  # type: ignore[arg-type]
    except MedgnError as exc:
        result.problems.append(exc.one_line())
        return None
    if vol.sha256 is not None:
        result.sha256[str(path)] = vol.sha256
    return vol


def channel_geometry_problem(first: Volume, vol: Volume, channel: int) -> str | None:
    """Why channel ``channel`` is not on the first channel's grid, or None (verify's and plan's words)."""
    diffs = geometry_diff(first, vol)
    return f"channel {channel} geometry differs from {first.path}: {'; '.join(diffs)}" if diffs else None


def label_geometry_problem(first: Volume, label: Volume) -> str | None:
    """Why the label is not on its image's grid, or None (verify's and plan's words)."""
    diffs = geometry_diff(first, label)
    return f"label geometry differs from image {first.path}: {'; '.join(diffs)}" if diffs else None


def _channels(
    case: Case, expected: int, limits: Limits, result: CaseResult, digest: bool
) -> list[tuple[int, Path, Volume]]:
    """(channel, file, volume) of every readable channel: one file each, or one 4D MSD file."""
    if len(case.images) == 1 and expected > 1:
        try:
            return [(c, case.images[0], v) for c, v in enumerate(read_channels(case.images[0], expected, limits))]
        except MedgnError as exc:
            result.problems.append(exc.one_line())
            return []
    kept = case.images[:expected] if expected else case.images  # an extra file is named below, not read
    for p in case.images:  # a test case's place kept for a file it lacks
        if (original := missing_original(p)) is not None:
            result.problems.append(f"channel file missing: {original}")
    extra = [p.name for p in case.images[len(kept) :] if missing_original(p) is None]
    if extra:
        result.problems.append(f"unexpected channel file (only {expected} channels declared): {', '.join(extra)}")
    present = [(c, p) for c, p in enumerate(kept) if missing_original(p) is None]
    read = [(c, p, _read(p, limits, result, digest)) for c, p in present]
    return [(c, p, v) for c, p, v in read if v is not None]


def verify_case(
    case: Case,
    index: DatasetIndex,
    limits: Limits = DEFAULT_LIMITS,
    target_spacing: Sequence[float] | None = None,
    *,
    rng: np.random.Generator | None = None,
    digests: bool = False,
) -> CaseResult:
    """Check one case; see :func:`verify_dataset`. With ``rng``, also take its fingerprint statistics;
    with ``digests``, each file's sha256 from the bytes the check reads."""
    result = CaseResult(case.case_id)
    label_values = sorted(index.labels.values()) if index.labels else None
    first: Volume | None = None
    kept: list[Volume] = []  # the channels, held only when statistics are taken
    names = index.channel_names
    for channel, path, vol in _channels(case, len(names), limits, result, digests):
        if float(vol.array.min()) == float(vol.array.max()):
            # Normalisation guards std == 0, so a constant channel is safe but worth a look.
            which = f"channel {channel} ({names[channel]}) is a " if len(names) > 1 else ""
            result.notes.append(f"{path}: {which}constant image (all voxels {float(vol.array.min()):g})")
        if first is None:
            first = vol
            result.shape, result.spacing = vol.shape, tuple(round(s, 4) for s in vol.spacing)
            if target_spacing is not None:
                try:
                    check_workload(path, vol.shape, vol.affine, target_spacing, limits)
                except MedgnError as exc:
                    result.problems.append(exc.one_line())
        elif (problem := channel_geometry_problem(first, vol, channel)) is not None:
            result.problems.append(f"{path}: {problem}")
        if rng is not None:
            kept.append(vol)
        del vol
    label = None
    if case.label is not None:
        label = _read(case.label, limits, result, digests, label=True, label_values=label_values)
        if label is not None:
            result.labels_found = np.unique(label.array).tolist()
            if first is not None and (problem := label_geometry_problem(first, label)) is not None:
                result.problems.append(f"{case.label}: {problem}")
    if rng is not None and result.ok and kept:
        result.stats = case_statistics(case.case_id, kept, label, rng)
    return result


def label_coverage(index: DatasetIndex, found: Iterable[int]) -> tuple[list[str], list[str]]:
    """Problems and warnings about the label values the training labels hold, all together.

    Args:
        index: the dataset (its declared labels; a folder dataset declares none).
        found: every label value present in at least one training label.

    Returns:
        ``(problems, warnings)``: a problem when no label holds any foreground (nothing to learn:
        training would run and report Dice 0); a warning naming each class declared in dataset.json
        that no training label holds (it can only score Dice 0; nnU-Net accepts such datasets).
    """
    values = {int(v) for v in found}
    where = index.root / "dataset.json" if index.format != "folders" else index.root / "labels"
    if not any(v > 0 for v in values):
        return [
            f"{where}: no training label holds any foreground (every voxel of all {len(index.cases)} label files "
            "is 0): there is nothing to learn; check that the label files are the right ones"
        ], []
    declared = sorted(index.labels.items(), key=lambda item: item[1])
    absent = [f"{name!r} ({value})" for name, value in declared if value > 0 and value not in values]
    if not absent:
        return [], []
    return [], [
        f"{where}: label(s) {', '.join(absent)} declared but present in no training label: the network cannot "
        "learn them and they score Dice 0 (add cases that hold them, or remove them from 'labels')"
    ]


def verify_dataset(
    index: DatasetIndex,
    limits: Limits = DEFAULT_LIMITS,
    *,
    progress: Callable[[CaseResult], None] | None = None,
    include_test: bool = False,
    target_spacing: Sequence[float] | None = None,
    stats_seed: int | None = None,
    digests: bool = False,
    warn: Callable[[str], None] | None = _warn,
) -> VerifyReport:
    """Check every case of a dataset and collect all problems.

    Args:
        index: from :func:`medgn.data.datasets.load_dataset`.
        limits: size limits for the header preflight.
        progress: called with each case's result as it finishes.
        include_test: also check the test cases (images only).
        target_spacing: a plan's spacing: each case's size once resampled is checked too
            (``limits.max_resampled_voxels``); None (no plan) checks the headers' limits only.
        stats_seed: when given, also take each training case's fingerprint statistics with this
            sampling seed (``report.stats``; the same numbers as ``compute_fingerprint(seed=...)``).
        digests: also record each file's sha256 (``report.sha256``), hashed from the bytes the
            check reads (a NIfTI file is read once for both; a 4D MSD image is not hashed here).
        warn: called with each of ``report.warnings`` (default: printed on stderr and logged, so
            ``medgn train`` shows them); None only records them in the report.

    Returns:
        The report; ``report.ok`` is False when any case, or the dataset as a whole, has a problem.

    Raises:
        InputDataError: the dataset declares region-based labels (exit 3), before any file is read.
    """
    refuse_unsupported_labels(index)
    results = []
    rng = np.random.default_rng(stats_seed) if stats_seed is not None else None
    cases = [(case, rng) for case in index.cases] + [
        (case, None) for case in (index.test_cases if include_test else [])
    ]
    for case, case_rng in cases:
        result = verify_case(case, index, limits, target_spacing, rng=case_rng, digests=digests)
        results.append(result)
        if progress is not None:
            progress(result)
    report = VerifyReport(index, results)
    training = results[: len(index.cases)]
    # Only when every training label was read: an unreadable one may hold the class (its problem is listed).
    if training and all(r.labels_found for r in training):
        report.dataset_problems, report.warnings = label_coverage(index, {v for r in training for v in r.labels_found})
    if warn is not None:
        for message in report.warnings:
            warn(message)
    return report


def require_valid(index: DatasetIndex, limits: Limits = DEFAULT_LIMITS) -> VerifyReport:
    """Run :func:`verify_dataset` and raise one error listing every problem (training's first step).

    Raises:
        InputDataError: any case has a problem (exit 3); the message lists each with its file.
    """
    report = verify_dataset(index, limits)
    problems = report.problems
    if problems:
        shown = "; ".join(problems[:20]) + (
            f"; and {len(problems) - 20} more (run 'medgn verify')" if len(problems) > 20 else ""
        )
        raise InputDataError(index.root, f"{len(problems)} problem(s) in the dataset: {shown}")
    return report
