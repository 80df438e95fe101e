"""The dataset files a run trains on, as its checkpoints record them, and the check on ``--resume``.

:func:`record_dataset` lists every labelled case with, per file (each channel's image, then the
label), its path inside the dataset, size, modification time and sha256. The record's ``sha256``
digests the case ids, sizes and contents only, so a copy of the dataset in another folder matches
it. :func:`dataset_changes` compares a dataset with a record: a file at the recorded path with the
recorded size and modification time counts as unchanged without being read (rsync's quick check);
any other file is hashed. A resume on other data (cases added, removed or changed) is refused
naming them: its splits, normalisation and best checkpoint belong to the data it started with.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medgn.data.datasets import Case, DatasetIndex
from medgn.data.detached import detached_data_files, with_data_files_sha256
from medgn.errors import InputDataError
from medgn.files import json_sha256, path_sha256

RECORD_VERSION = 1
SHOWN = 5  # case ids named per kind of change in a one-line error


@dataclass
class DatasetChanges:
    """How a dataset differs from a run's record (case ids; changed ones with their files)."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: dict[str, list[str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def describe(self) -> str:
        """One line: the counts and the first few case ids (changed ones with their files)."""
        parts = []
        for kind, ids in (("added", self.added), ("removed", self.removed)):
            if ids:
                more = f", ... {len(ids) - SHOWN} more" if len(ids) > SHOWN else ""
                parts.append(f"{len(ids)} case(s) {kind} ({', '.join(ids[:SHOWN])}{more})")
        if self.changed:
            shown = [f"{cid}: {', '.join(files)}" for cid, files in list(self.changed.items())[:SHOWN]]
            more = f"; ... {len(self.changed) - SHOWN} more" if len(self.changed) > SHOWN else ""
            parts.append(f"{len(self.changed)} case(s) changed ({'; '.join(shown)}{more})")
        return "; ".join(parts)


def _slots(case: Case) -> list[tuple[str, Path]]:
    """(slot, file) of a case: ``image0``, ``image1``, ... then ``label``."""
    slots = [(f"image{i}", Path(p)) for i, p in enumerate(case.images)]
    return slots + ([("label", Path(case.label))] if case.label is not None else [])


def _relative(root: Path, path: Path) -> str:
    try:
        return os.path.relpath(path, root)
    except ValueError:  # another drive (Windows)
        return str(path)


def _stat(path: Path) -> tuple[int, int]:
    """(bytes, newest modification time in ns) of a file with its detached data files (a ``.mhd``'s
    ``.raw``), or of a folder's files (a DICOM series)."""
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file()]
        stats = [p.stat() for p in files]
        return sum(s.st_size for s in stats), max([path.stat().st_mtime_ns, *(s.st_mtime_ns for s in stats)])
    stats = [p.stat() for p in (path, *detached_data_files(path))]
    return sum(s.st_size for s in stats), max(s.st_mtime_ns for s in stats)


def _entry(root: Path, path: Path, known: Mapping[str, Any] | None, read: str | None) -> dict[str, Any]:
    """A file's record; the sha256 of ``known`` is reused when path, size and mtime are unchanged,
    ``read`` (the sha256 of the file's own bytes, taken as they were read) when given."""
    relative = _relative(root, path)
    try:
        size, mtime = _stat(path)
        same = (
            isinstance(known, Mapping)
            and known.get("path") == relative
            and known.get("size") == size
            and known.get("mtime_ns") == mtime
            and isinstance(known.get("sha256"), str)
        )
        if same:
            sha = known["sha256"]  # type: ignore[index]
        else:
            sha = with_data_files_sha256(path, read if read is not None else path_sha256(path))
    except OSError as exc:
        raise InputDataError(path, f"cannot read the file ({exc.strerror or exc})", expected="readable data") from None
    return {"path": relative, "size": size, "mtime_ns": mtime, "sha256": sha}


def _digest(cases: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """sha256 of case ids, slots, sizes and contents: not of paths or times, so a copy matches."""
    return json_sha256(
        {cid: {slot: [e["size"], e["sha256"]] for slot, e in files.items()} for cid, files in cases.items()}
    )


def record_dataset(
    index: DatasetIndex, known: Mapping[str, Any] | None = None, read: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The record of every labelled case's files (JSON-able; goes into checkpoints).

    Args:
        index: the dataset.
        known: an earlier record: a file unchanged by the quick check keeps its sha256 unread.
        read: sha256 of files' own bytes by their paths as the dataset lists them, from a pass that
            already read them (verification's ``report.sha256``): those files are not read again.

    Raises:
        InputDataError: a file that cannot be read (exit 3), named.
    """
    old_cases = (known or {}).get("cases") or {}
    cases: dict[str, dict[str, Any]] = {}
    for case in index.cases:
        old = old_cases.get(case.case_id) if isinstance(old_cases, Mapping) else None
        cases[case.case_id] = {
            slot: _entry(
                index.root, path, old.get(slot) if isinstance(old, Mapping) else None, (read or {}).get(str(path))
            )
            for slot, path in _slots(case)
        }
    return {"version": RECORD_VERSION, "sha256": _digest(cases), "cases": cases}


def valid_record(record: Any) -> bool:
    """Whether ``record`` is a dataset record this version can compare with."""
    return (
        isinstance(record, Mapping)
        and record.get("version") == RECORD_VERSION
        and isinstance(record.get("sha256"), str)
        and isinstance(record.get("cases"), Mapping)
        and all(isinstance(files, Mapping) for files in record["cases"].values())
    )


def dataset_changes(record: Mapping[str, Any], index: DatasetIndex) -> tuple[dict[str, Any], DatasetChanges]:
    """The dataset's record now and how it differs from ``record`` (see :func:`record_dataset`).

    Returns:
        (the current record, reusing ``record``'s hashes where the quick check allows; the changes).
    """
    current = record_dataset(index, known=record)
    changes = DatasetChanges()
    if current["sha256"] == record.get("sha256"):
        return current, changes
    old, new = record["cases"], current["cases"]
    changes.added = sorted(set(new) - set(old))
    changes.removed = sorted(set(old) - set(new))
    for cid in sorted(set(old) & set(new)):
        a, b = old[cid], new[cid]
        files = [
            str(b.get(slot, a.get(slot, {})).get("path", slot))
            for slot in sorted(set(a) | set(b))
            if not isinstance(a.get(slot), Mapping)
            or slot not in b
            or (a[slot].get("size"), a[slot].get("sha256")) != (b[slot]["size"], b[slot]["sha256"])
        ]
        if files:
            changes.changed[cid] = files
    return current, changes
