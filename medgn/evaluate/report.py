"""The written forms of an evaluation: summary statistics, ``metrics.csv``, ``summary.json``,
``report.md`` and the plain-text table the command prints.

Infinite distances (one side empty, missing or failed case) keep their meaning in every form: the
CSV says ``inf``, the JSON says ``null`` with the row's flags and an ``infinite`` list naming the
metrics, the statistics are over the finite values with the count of infinite ones beside them. A
structure in no map of any evaluated case (``absent``) has NaN rows (CSV ``nan``, JSON ``null``),
is marked ``(absent)`` in the tables and is left out of its per-class and the overall statistics.
All files are written atomically through :mod:`medgn.files`.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medgn.evaluate.metrics import (
    FLAG_ABSENT,
    FLAG_BOTH_EMPTY,
    FLAG_FAILED,
    FLAG_MISSING,
    FLAG_PRED_EMPTY,
    FLAG_REF_EMPTY,
    METRIC_NAMES,
    summarize,
)
from medgn.files import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from medgn.evaluate.results import EvaluationResult, MetricRow

EMPTY_FLAGS: tuple[str, ...] = (FLAG_BOTH_EMPTY, FLAG_REF_EMPTY, FLAG_PRED_EMPTY)
CSV_COLUMNS: tuple[str, ...] = ("case", "label", *METRIC_NAMES, "flags")


def _flag_counts(rows: Sequence[MetricRow]) -> dict[str, int]:
    return {flag: sum(flag in r.metrics.flags for r in rows) for flag in EMPTY_FLAGS}


def _stats(rows: Sequence[MetricRow]) -> dict[str, Any]:
    out: dict[str, Any] = {name: summarize([r.metrics.value(name) for r in rows]) for name in METRIC_NAMES}
    out["empty"] = _flag_counts(rows)
    return out


def worst_cases(result: EvaluationResult, k: int) -> dict[str, list[str]]:
    """Per label and region, the ``k`` evaluated cases with the lowest Dice (then the largest HD95).

    Missing and failed cases and cases where both maps are empty (or the label is absent from
    every case) are left out: there is nothing to draw for them.
    """
    skip = {FLAG_MISSING, FLAG_FAILED, FLAG_BOTH_EMPTY, FLAG_ABSENT}
    out: dict[str, list[str]] = {}
    for key in [*(str(v) for v in result.labels), *result.regions]:
        rows = [r for r in result.rows if r.label == key and not skip.intersection(r.metrics.flags)]
        rows.sort(key=lambda r: (r.metrics.dice, -r.metrics.hd95, r.case))
        out[key] = [r.case for r in rows[:k]]
    return out


def build_summary(
    result: EvaluationResult, settings: dict[str, Any], *, n_unmatched: int, worst_k: int, n_not_predicted: int = 0
) -> dict[str, Any]:
    """Statistics per label and region and over all labels, with counts, failures and settings.

    ``overall`` pools every (case, label) row of the labels (regions would count voxels twice);
    with the same cases under every label, its mean is the mean of the per-label means. A label or
    region in ``result.absent`` (in no map of any evaluated case) is not scored: its per-class
    statistics count no row (``n`` 0, means ``None``) and ``overall`` leaves its rows out.
    """
    absent = set(result.absent)
    label_keys = [str(v) for v in result.labels]
    per_class = {
        key: _stats([r for r in result.rows if r.label == key and key not in absent])
        for key in [*label_keys, *result.regions]
    }
    label_rows = [r for r in result.rows if r.label in label_keys and r.label not in absent]
    if result.cases:
        n_cases = len(result.cases)
    else:  # a result built without its case list
        n_cases = len({r.case for r in result.rows} | set(result.failures) | set(result.missing))
    return {
        "counts": {
            "cases": n_cases,
            "evaluated": n_cases - len(result.failures) - len(result.missing),
            "missing": len(result.missing),
            "failed": len(result.failures),
            "unmatched_predictions": n_unmatched,
            "references_not_predicted": n_not_predicted,  # left out by --only-predicted
            "empty": _flag_counts(label_rows),
        },
        "per_class": per_class,
        "label_names": dict(result.label_names),
        "overall": _stats(label_rows),
        "absent": list(result.absent),
        "missing": list(result.missing),
        "failures": dict(result.failures),
        "worst_cases": worst_cases(result, worst_k),
        "settings": settings,
        "policy": {
            "both_empty": "Dice 1, IoU 1, NSD 1, distances 0",
            "ref_empty_or_pred_empty": "Dice 0, IoU 0, NSD 0, distances infinite",
            "missing_or_failed": "Dice 0, IoU 0, NSD 0, distances infinite",
            "absent": "a label or region in no reference and no prediction of any evaluated case: metrics NaN "
            "(null in JSON), left out of its per-class and the overall statistics",
            "statistics": "population std; distances over finite values only, n_inf counts the others",
        },
    }


def _csv_number(value: float) -> str:
    return "inf" if math.isinf(value) else repr(float(value))


def metrics_csv(rows: Sequence[MetricRow]) -> str:
    """One line per case and structure; infinite distances written as ``inf``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow(
            [
                row.case,
                row.label,
                *(_csv_number(row.metrics.value(n)) for n in METRIC_NAMES),
                ";".join(row.metrics.flags),
            ]
        )
    return buffer.getvalue()


def _json_row(row: MetricRow) -> dict[str, Any]:
    out = row.as_dict()
    infinite = [name for name in METRIC_NAMES if math.isinf(out[name])]
    for name in METRIC_NAMES:
        if not math.isfinite(out[name]):
            out[name] = None  # JSON has no infinity or NaN: null, named in "infinite" or flagged "absent"
    out["infinite"] = infinite
    return out


def summary_json(result: EvaluationResult) -> dict[str, Any]:
    """The summary plus every row, ready for strict JSON (no NaN or Infinity)."""
    return {**result.summary, "cases": [_json_row(r) for r in result.rows]}


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table_rows(result: EvaluationResult) -> list[list[str]]:
    tol = result.summary["settings"]["nsd_tolerance_mm"]
    header = [
        "class",
        "n",
        "Dice mean",
        "Dice std",
        "Dice median",
        "IoU mean",
        "HD95 mean mm",
        "HD95 inf",
        "ASSD mean mm",
        f"NSD@{tol:g}mm mean",
        "empty both/ref/pred",
    ]
    lines = [header]
    sections = [*result.summary["per_class"].items(), ("overall", result.summary["overall"])]
    absent = set(result.summary.get("absent", ()))
    for key, stats in sections:
        empty = stats["empty"]
        lines.append(
            [
                f"{result.named(key)} (absent)" if key in absent else result.named(key),
                str(stats["dice"]["n"]),
                _num(stats["dice"]["mean"]),
                _num(stats["dice"]["std"]),
                _num(stats["dice"]["median"]),
                _num(stats["iou"]["mean"]),
                _num(stats["hd95"]["mean"], 2),
                str(stats["hd95"]["n_inf"]),
                _num(stats["assd"]["mean"], 2),
                _num(stats["nsd"]["mean"]),
                f"{empty[FLAG_BOTH_EMPTY]}/{empty[FLAG_REF_EMPTY]}/{empty[FLAG_PRED_EMPTY]}",
            ]
        )
    return lines


def format_table(result: EvaluationResult) -> str:
    """The per-class summary as an aligned plain-text table (what ``medgn evaluate`` prints)."""
    lines = _table_rows(result)
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


_MARKDOWN_SPECIAL = "\\`*_[]<>|~&"
_LEADING = re.compile(r"^(\d+)([.)])|^([-+#=>])")  # what would start a list, heading or quote


def md_text(text: str) -> str:
    """``text`` shown as written in Markdown: a case named ``a|b*c*`` neither splits a table cell
    nor turns italic, ``a&amp;b`` stays as typed, and ``1. first`` starts no list."""
    out = "".join(f"\\{ch}" if ch in _MARKDOWN_SPECIAL else ch for ch in str(text))
    return _LEADING.sub(lambda m: f"{m.group(1)}\\{m.group(2)}" if m.group(1) else f"\\{m.group(3)}", out)


def _markdown(lines: Sequence[Sequence[str]], text_columns: Sequence[int] = (0,)) -> list[str]:
    """A Markdown table; the cells of ``text_columns`` (names) are escaped, numbers and flags kept plain."""
    out = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
    out += [
        "| " + " | ".join(md_text(cell) if i in text_columns else cell for i, cell in enumerate(line)) + " |"
        for line in lines[1:]
    ]
    return out


DEFINITIONS = (
    "**Dice** = 2|P∩R| / (|P| + |R|) and **IoU** = |P∩R| / |P∪R| of the prediction P and the reference R "
    "(1 is perfect). **HD95**: the 95th percentile of the distances, in mm, from each map's surface to "
    "the other's, both ways (0 is perfect). **ASSD**: the mean of those distances. **NSD@t**: the share "
    "of both surfaces within t mm of the other surface (surface Dice; 1 is perfect). Distances use the "
    "reference's voxel spacing. **std** is the population standard deviation (0 for one case). "
    "**overall** pools every case of every label (regions left out: their voxels are counted in their labels)."
)


def report_markdown(result: EvaluationResult, figures: Sequence[Path] = ()) -> str:
    """A readable report: counts, the per-class table, failures, every case, the figures."""
    s = result.summary
    c = s["counts"]
    text = ["# Evaluation report", ""]
    text.append(
        f"Predictions `{s['settings']['pred_dir']}` against references `{s['settings']['ref_dir']}`; "
        f"surface Dice tolerance {s['settings']['nsd_tolerance_mm']:g} mm."
    )
    text.append("")
    text.append(
        f"Cases: {c['cases']}, evaluated {c['evaluated']}, missing {c['missing']}, failed {c['failed']}, "
        f"predictions without reference {c['unmatched_predictions']}. Empty maps among the label rows: "
        f"both empty {c['empty'][FLAG_BOTH_EMPTY]}, reference empty {c['empty'][FLAG_REF_EMPTY]}, "
        f"prediction empty {c['empty'][FLAG_PRED_EMPTY]}."
    )
    if s.get("absent"):
        text += [
            "",
            f"Not scored (in no reference and no prediction of any evaluated case): {', '.join(s['absent'])}; "
            "their rows are NaN and the statistics leave them out.",
        ]
    if c.get("references_not_predicted"):
        text += ["", f"Only predicted cases were scored: {c['references_not_predicted']} references left out."]
    text += ["", "## Per class", ""]
    text += _markdown(_table_rows(result))
    text += [
        "",
        "Both empty: Dice 1, distances 0. One side empty, missing or failed: Dice 0, distances "
        "infinite; HD95/ASSD means are over finite values and `HD95 inf` counts the others. "
        "`empty both/ref/pred`: the rows where both maps are empty, where the reference is empty and where "
        "the prediction is empty.",
        "",
        DEFINITIONS,
        "",
    ]
    if result.failures or result.missing:
        text += ["## Failed and missing cases", ""]
        text += [f"- {md_text(cid)} failed: {md_text(why)}" for cid, why in result.failures.items()]
        text += [f"- {md_text(cid)}: prediction missing (counted as Dice 0)" for cid in result.missing]
        text.append("")
    worst = s.get("worst_cases", {})
    if any(worst.values()):
        text += ["## Worst cases", ""]
        for key, cases in worst.items():
            if cases:
                listed = ", ".join(f"{md_text(cid)} (Dice {_num(result.value(cid, key, 'dice'), 3)})" for cid in cases)
                text.append(
                    f"- {'region' if key in result.regions else 'label'} {md_text(result.named(key))}: {listed}"
                )
        text.append("")
    text += ["## Every case", ""]
    lines = [list(CSV_COLUMNS)]
    for row in result.rows:
        m = row.metrics
        lines.append(
            [
                row.case,
                row.label,
                _num(m.dice, 4),
                _num(m.iou, 4),
                "inf" if math.isinf(m.hd95) else _num(m.hd95, 2),
                "inf" if math.isinf(m.assd) else _num(m.assd, 2),
                _num(m.nsd, 4),
                ", ".join(m.flags),
            ]
        )
    text += _markdown(lines, text_columns=(0, 1))
    if figures:
        from urllib.parse import quote

        text += ["", "## Figures", ""]
        text.append(
            "The box plot of Dice and HD95 per class, then the worst cases' overlays (reference wide green, "
            "prediction narrow red; radiological convention, edges lettered)."
        )
        text.append("")
        for p in figures:
            text += [f"![{md_text(p.stem)}]({quote(p.as_posix())})", "", f"*{md_text(p.stem)}*", ""]
    return "\n".join(text) + "\n"


def write_outputs(result: EvaluationResult, out_dir: Path, figures: Sequence[Path] = ()) -> list[Path]:
    """Write ``metrics.csv``, ``summary.json`` and ``report.md`` atomically; return their paths.

    Args:
        result: the evaluation.
        out_dir: an existing folder.
        figures: figure paths relative to ``out_dir`` that the report should show.
    """
    csv_path = atomic_write_text(out_dir / "metrics.csv", metrics_csv(result.rows))
    json_path = atomic_write_json(out_dir / "summary.json", summary_json(result))
    md_path = atomic_write_text(out_dir / "report.md", report_markdown(result, figures))
    return [csv_path, json_path, md_path]
