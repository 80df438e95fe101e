"""K-fold cross-validation splits: deterministic from a seed, written once next to the plan.

This module owns :func:`make_splits` and :func:`load_or_create_splits`. A splits file is created
atomically the first time and then only read, so every later run (and every fold) sees the same
partition even if the case list or code changes; a file that no longer matches the dataset fails.
"""

from __future__ import annotations

import json
import os
from collections import Counter
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


def _names(ids: Sequence[str] | set[str], limit: int = 5) -> str:
    shown = sorted(ids)[:limit]
    return ", ".join(shown) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _check_splits(path: Path, splits: object, case_ids: Sequence[str], other_dataset: str) -> None:
    """Refuse a splits file that is not a list of folds over exactly the dataset's cases.

    Every case is validated in exactly one fold, every fold validates some; a fold trains only on
    known cases, each once, never on its own validation cases, and on at least one case. (A fold
    may train on fewer than all other cases, as a hand-made split can leave some out.)
    """
    folds = splits if isinstance(splits, list) else None
    ok = folds is not None and all(
        isinstance(f, dict)
        and all(isinstance(f.get(k), list) and all(isinstance(c, str) for c in f[k]) for k in ("train", "val"))
        for f in folds
    )
    if not ok or not folds:
        raise InputDataError(
            path, "splits file is malformed", expected='a list of {"train": [...], "val": [...]} folds'
        )
    known = set(case_ids)
    val = [c for f in folds for c in f["val"]]
    twice = {c for c, n in Counter(val).items() if n > 1}
    if twice:
        raise InputDataError(path, f"cases listed more than once in the 'val' lists: {_names(twice)}")
    missing, extra = known - set(val), set(val) - known
    if missing or extra:
        detail = "; ".join(
            part
            for part in (
                f"{len(extra)} not in the dataset ({_names(extra)})" if extra else "",
                f"{len(missing)} of the dataset's missing ({_names(missing)})" if missing else "",
            )
            if part
        )
        raise InputDataError(
            path,
            f"splits do not match the dataset's cases: {detail}",
            got=f"{len(val)} cases",
            expected=f"{len(known)} cases: {other_dataset}",
        )
    for k, fold in enumerate(folds):
        if not fold["val"]:
            raise InputDataError(path, f"fold {k} validates no case", expected="every fold's 'val' list not empty")
        repeated = {c for c, n in Counter(fold["train"]).items() if n > 1}
        if repeated:
            raise InputDataError(path, f"fold {k} lists training cases twice: {_names(repeated)}")
        train = set(fold["train"])
        unknown, leaked = train - known, train & set(fold["val"])
        if unknown:
            raise InputDataError(path, f"fold {k} trains on cases not in the dataset: {_names(unknown)}")
        if leaked:
            raise InputDataError(path, f"fold {k} trains on its own validation cases: {_names(leaked)}")
        if not train:
            raise InputDataError(path, f"fold {k} has no training cases")


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
        _check_splits(path, splits, case_ids, other_dataset)
        return splits
    splits = make_splits(case_ids, n_folds, seed)
    atomic_write_json(path, splits, overwrite=False)
    return splits
