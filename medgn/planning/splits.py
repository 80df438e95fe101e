"""K-fold cross-validation splits: deterministic from a seed, written once next to the plan.

This module owns :func:`make_splits` and :func:`load_or_create_splits`. A splits file is created
atomically the first time and then only read, so every later run (and every fold) sees the same
partition even if the case list or code changes; a file that no longer matches the dataset fails.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medgn.errors import InputDataError, UsageError
from medgn.files import atomic_write_json

ALL_FOLDS = -1  # --fold all: train on every case, no validation split
SPLITS_FILE = "splits.json"  # next to a plan (where `medgn plan` writes it) and in every run folder


def make_splits(case_ids: Sequence[str], n_folds: int = 5, seed: int = 0) -> list[dict[str, list[str]]]:
    """Partition case ids into ``n_folds`` folds of near-equal size.

    Args:
        case_ids: unique case ids (order does not matter: they are sorted first).
        n_folds: number of folds (>= 2, <= number of cases).
        seed: seed of the shuffle.

    Returns:
        One ``{"train": [...], "val": [...]}`` per fold; every case is in exactly one ``val``.
    """
    ids = sorted(case_ids)
    if len(set(ids)) != len(ids):
        raise InputDataError("case ids", "duplicate case ids", got=sorted({i for i in ids if ids.count(i) > 1}))
    if not 2 <= n_folds <= len(ids):
        raise UsageError(
            "n_folds", "invalid number of folds", got=n_folds, expected=f"2..{len(ids)} (the number of cases)"
        )
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = np.array_split(order, n_folds)
    return [
        {"train": sorted(ids[i] for i in order if i not in set(fold.tolist())), "val": sorted(ids[i] for i in fold)}
        for fold in folds
    ]


def load_or_create_splits(
    path: str | os.PathLike[str],
    case_ids: Sequence[str],
    n_folds: int = 5,
    seed: int = 0,
    *,
    other_dataset: str = "delete this file only if it is this dataset's and stale",
) -> list[dict[str, list[str]]]:
    """Read ``path`` when it exists (checking it covers exactly ``case_ids``), else create it.

    ``other_dataset`` is the advice when the file holds other cases (the command knows which of
    its options put it there).
    """
    path = Path(path)
    if path.exists():
        try:
            splits = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputDataError(path, f"cannot read splits ({exc})") from None
        try:
            val = sorted(c for fold in splits for c in fold["val"])
        except (TypeError, KeyError):
            raise InputDataError(path, "splits file is malformed", expected="a list of {train, val} folds") from None
        if val != sorted(case_ids):
            raise InputDataError(
                path,
                "splits do not match the dataset's cases",
                got=f"{len(val)} cases",
                expected=f"{len(case_ids)} cases: {other_dataset}",
            )
        return splits
    splits = make_splits(case_ids, n_folds, seed)
    atomic_write_json(path, splits, overwrite=False)
    return splits
