"""Post-processing of predicted label maps, and the evidence that decides it per class.

nnU-Net decides from cross-validation whether keeping only the largest connected component of a
class helps; medgn does the same. :func:`lcc_evidence` scores each held-out case with and without
the filter; :func:`decide` turns pooled evidence (one fold or several) into a
:class:`PostProcessing` decision, which training stores as ``postprocessing.json`` in the run
folder and ``medgn infer`` applies by default. A run trained on every case has no held-out cases:
:func:`topology_evidence` then looks at the reference labels themselves, and the filter is chosen
only for classes that form a single connected piece in every training label (the filter can only
remove true positives when a reference has several pieces).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medgn.data.boxes import nonzero_box
from medgn.errors import ModelError, brief

__all__ = [
    "PostProcessing",
    "apply",
    "decide",
    "decide_from_topology",
    "largest_component",
    "lcc_evidence",
    "pooled",
    "topology_evidence",
]

FILE = "postprocessing.json"
# A reference class counts as one piece when its largest 26-connected component holds this share of
# its voxels: a few stray voxels of annotation noise do not make a structure multi-part.
ONE_PIECE_SHARE = 0.99
# The filter must raise the mean Dice by more than this to be chosen (ties keep the raw prediction).
MIN_GAIN = 1e-4


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (empty stays empty).

    Labelled inside the mask's bounding box only: an organ fills a small part of a scan, and
    labelling the whole grid took most of the time (0.2 s of a 2.3 M-voxel LA2018 scan).
    """
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    box = nonzero_box(mask)
    if box is None:
        return mask.copy()
    labels, count = ndimage.label(mask[box], structure=np.ones((3,) * mask.ndim, dtype=bool))
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    out = np.zeros_like(mask)
    out[box] = labels == int(sizes.argmax())
    return out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def lcc_evidence(pred: np.ndarray, ref: np.ndarray, classes: Iterable[int]) -> dict[int, tuple[float, float]]:
    """Per class: (Dice of the raw prediction, Dice after keeping its largest component)."""
    out = {}
    for k in classes:
        p, r = pred == k, ref == k
        out[int(k)] = (_dice(p, r), _dice(largest_component(p), r))
    return out


def topology_evidence(ref: np.ndarray, classes: Iterable[int]) -> dict[int, bool]:
    """Per class: whether the reference is one connected piece (absent classes count as one piece)."""
    out = {}
    for k in classes:
        mask = ref == k
        total = int(mask.sum())
        out[int(k)] = total == 0 or int(largest_component(mask).sum()) >= ONE_PIECE_SHARE * total
    return out


@dataclass(frozen=True)
class PostProcessing:
    """Which classes keep only their largest connected component, and why.

    Attributes:
        lcc: class label -> keep the largest component.
        source: "cross-validation" (held-out Dice with and without) or "reference topology".
        evidence: per class, the mean Dice without/with the filter and the case count, or the
            number of training labels that are one piece.
    """

    lcc: dict[int, bool] = field(default_factory=dict)
    source: str = "none"
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "lcc": {str(k): v for k, v in sorted(self.lcc.items())},
            "source": self.source,
            "evidence": self.evidence,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PostProcessing:
        return cls(
            {int(k): bool(v) for k, v in dict(data.get("lcc", {})).items()},
            str(data.get("source", "none")),
            dict(data.get("evidence", {})),
        )

    @classmethod
    def load(cls, run_dir: Path) -> PostProcessing | None:
        """The decision stored in a run folder, or None when it has none."""
        path = Path(run_dir) / FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            lcc = data.get("lcc", {}) if isinstance(data, dict) else None
            if not isinstance(lcc, dict) or not all(isinstance(v, bool) for v in lcc.values()):
                raise ValueError('expected {"lcc": {"1": true, ...}, ...}')
            return cls.from_dict(data)
        except (OSError, UnicodeDecodeError, ValueError, TypeError, RecursionError) as exc:
            raise ModelError(
                path,
                f"unreadable post-processing decision ({brief(exc, 120)})",
                expected="the postprocessing.json medgn writes after cross-validation (or --postprocess none)",
            ) from None

    def describe(self) -> str:
        chosen = [str(k) for k, on in sorted(self.lcc.items()) if on]
        return (
            f"largest component for class(es) {', '.join(chosen)} ({self.source})"
            if chosen
            else f"none ({self.source})"
        )


def _from_means(means: Mapping[int, tuple[float, float, int]]) -> PostProcessing:
    """The decision from per-class (mean Dice raw, mean Dice filtered, cases): on when it helps."""
    lcc = {k: filtered > raw + MIN_GAIN for k, (raw, filtered, _) in means.items()}
    evidence = {
        str(k): {"dice": round(raw, 5), "dice_largest_component": round(filtered, 5), "cases": n}
        for k, (raw, filtered, n) in means.items()
    }
    return PostProcessing(lcc, "cross-validation", evidence)


def decide(per_case: Sequence[Mapping[int, tuple[float, float]]]) -> PostProcessing:
    """Choose the filter per class from held-out cases: on when it raises the mean Dice."""
    means = {}
    for k in sorted({k for case in per_case for k in case}):
        pairs = [case[k] for case in per_case if k in case]
        means[k] = (float(np.mean([p[0] for p in pairs])), float(np.mean([p[1] for p in pairs])), len(pairs))
    return _from_means(means)


def decide_from_topology(per_case: Sequence[Mapping[int, bool]]) -> PostProcessing:
    """Choose the filter for classes that are one piece in every reference label."""
    classes = sorted({k for case in per_case for k in case})
    lcc = {k: all(case.get(k, True) for case in per_case) for k in classes}
    evidence = {
        str(k): {"one_piece": sum(case.get(k, True) for case in per_case), "cases": len(per_case)} for k in classes
    }
    return PostProcessing(lcc, "reference topology", evidence)


def pooled(decisions: Sequence[PostProcessing]) -> PostProcessing:
    """One decision for a fold ensemble: cross-validation evidence pooled over folds, else agreement."""
    if not decisions:
        return PostProcessing()
    if len(decisions) == 1:
        return decisions[0]  # one model: its decision with its evidence, as postprocessing.json has it
    if all(d.source == "cross-validation" for d in decisions):
        means = {}
        for k in sorted({k for d in decisions for k in d.lcc}):
            rows = [d.evidence[str(k)] for d in decisions if str(k) in d.evidence]
            n = sum(int(r["cases"]) for r in rows)
            raw = sum(r["dice"] * r["cases"] for r in rows) / max(n, 1)
            filtered = sum(r["dice_largest_component"] * r["cases"] for r in rows) / max(n, 1)
            means[k] = (raw, filtered, n)
        return _from_means(means)
    classes = sorted({k for d in decisions for k in d.lcc})
    return PostProcessing(
        {k: all(d.lcc.get(k, False) for d in decisions) for k in classes},
        "+".join(sorted({d.source for d in decisions})),
    )


def apply(mask: np.ndarray, decision: PostProcessing, background: int = 0) -> np.ndarray:
    """The class-index map with the chosen classes reduced to their largest component.

    Removed voxels become ``background``; classes without the filter are untouched.
    """
    out = mask.copy()
    for k, on in decision.lcc.items():
        if on:
            keep = largest_component(mask == k)
            out[(mask == k) & ~keep] = background
    return out
