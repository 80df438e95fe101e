"""The result types of an evaluation and how prediction/reference files are matched to cases.

This module owns :class:`MetricRow` (one case and one structure), :class:`EvaluationResult` (what
:func:`medgn.evaluate.run.evaluate` returns), and the case-id rule for file names. The report and
figure modules read these types; nothing here computes metrics or writes files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medgn.data.preflight import MASK_SUFFIXES
from medgn.errors import EXIT_INPUT, EXIT_OK, InputDataError, UsageError
from medgn.evaluate.metrics import METRIC_NAMES, ClassMetrics
from medgn.files import path_problem

# Every label file the readers take (a header with its detached data file too), and a DICOM-SEG
# prediction; a reference must be a label volume (a DICOM-SEG has no grid of its own to score on).
REFERENCE_SUFFIXES: tuple[str, ...] = (*MASK_SUFFIXES, ".nhdr", ".mhd")
CASE_SUFFIXES: tuple[str, ...] = (".seg.dcm", *REFERENCE_SUFFIXES)


@dataclass(frozen=True)
class MetricRow:
    """One case and one structure (a label, or a named region of labels)."""

    case: str
    label: str
    metrics: ClassMetrics

    def as_dict(self) -> dict[str, Any]:
        """Case, label, the five metrics (floats, ``inf`` kept) and the flags."""
        out: dict[str, Any] = {"case": self.case, "label": self.label}
        out.update({name: self.metrics.value(name) for name in METRIC_NAMES})
        out["flags"] = list(self.metrics.flags)
        return out


@dataclass
class EvaluationResult:
    """What :func:`evaluate` found.

    Attributes:
        rows: one row per case and structure, cases in sorted order, labels then regions.
        summary: statistics per structure and overall, counts, settings, failures (the content of
            ``summary.json``, with infinite values kept as ``inf`` here).
        failures: case id -> why it could not be evaluated (unreadable, geometry mismatch).
        missing: case ids with a reference but no prediction (only with ``allow_missing``).
        labels: the labels evaluated; regions: the named unions evaluated.
        cases: every case of the run (reference order), scored, failed or missing alike.
        absent: the labels and regions (as row keys) found in no reference and no prediction of any
            evaluated case: their rows of evaluated cases are NaN, flagged ``absent``, and the
            per-class and overall statistics leave them out.
        out_dir: where the reports were written, or None.
        files: the files written.
        label_names: label value (as a row key) -> the name its dataset gives it, for readers.
    """

    rows: list[MetricRow]
    summary: dict[str, Any]
    failures: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    labels: tuple[int, ...] = ()
    regions: dict[str, tuple[int, ...]] = field(default_factory=dict)
    cases: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    out_dir: Path | None = None
    files: list[Path] = field(default_factory=list)
    label_names: dict[str, str] = field(default_factory=dict)

    def named(self, key: str) -> str:
        """A label or region as shown to readers: ``1 (left_atrium)`` when the dataset names label 1."""
        name = self.label_names.get(key)
        return f"{key} ({name})" if name else key

    @property
    def exit_code(self) -> int:
        """3 when any case failed (missing predictions allowed by the caller do not count)."""
        return EXIT_INPUT if self.failures else EXIT_OK

    def value(self, case: str, label: str | int, metric: str) -> float:
        """One number, e.g. ``result.value("case_01", 1, "dice")``."""
        for row in self.rows:
            if row.case == case and row.label == str(label):
                return row.metrics.value(metric)
        raise KeyError(f"no row for case {case!r}, label {label!r}")


def case_id(name: str) -> str | None:
    """The case id of a file name (suffix removed), or None for files that are not volumes."""
    lower = name.lower()
    for suffix in CASE_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix) and not name.startswith("."):
            return name[: -len(suffix)]
    return None


def list_cases(folder: Path) -> dict[str, Path]:
    """Map case id -> file for every volume in ``folder`` (not recursive).

    Every entry named like a volume is a case, whatever it is: a dangling symbolic link, a FIFO or
    a folder called ``c2.nii.gz`` is listed too, so that the run reports that case as failed
    (:func:`medgn.evaluate.run.evaluate` names what it is) instead of leaving it out unseen.

    Raises:
        UsageError: the folder does not exist.
        InputDataError: two files give the same case id (e.g. ``a.nii`` and ``a.nii.gz``); a
            ``<case>.seg.dcm`` next to a mask of the same case is not a clash (the mask is used).
    """
    if not folder.is_dir():
        problem = path_problem(folder) or "a file"
        words = "folder does not exist" if problem == "not found" else f"not a folder: {problem}"
        raise UsageError(folder, words, expected="a folder of label volumes")
    cases: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        cid = case_id(path.name)
        if cid is None:
            continue
        if cid in cases and ".seg.dcm" in (cases[cid].name.lower()[-8:], path.name.lower()[-8:]):
            # infer writes a DICOM-SEG next to the NIfTI mask of a DICOM series: the mask on the
            # exact grid is the one to evaluate; a SEG alone is read back onto the reference grid.
            cases[cid] = cases[cid] if not cases[cid].name.lower().endswith(".seg.dcm") else path
            continue
        if cid in cases:
            raise InputDataError(
                folder,
                f"two files for case {cid!r}",
                got=f"{cases[cid].name} and {path.name}",
                expected="one file per case",
            )
        cases[cid] = path
    return cases
