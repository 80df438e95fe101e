"""Inference bookkeeping: safe output names, output-folder checks, shards, hashes and the report.

This module owns everything :func:`medgn.infer.run.infer` decides before a model is loaded and
what it records after each case: case ids turned into file names that cannot leave the output
folder (separators replaced, no leading ``-`` or ``.``, unicode kept, collisions refused), the
refusal to write into the input tree or into an unwritable folder, the ``--shard i/n`` selection
(also from torchrun's ``RANK``/``WORLD_SIZE``), input sha256s, the per-case result record and the
``report.json`` summary with the overall exit code.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medgn.errors import EXIT_OK, UsageError
from medgn.files import atomic_write_json, make_output_dir, path_sha256
from medgn.files import is_inside as _inside

__all__ = [
    "CaseResult",
    "InferenceReport",
    "check_output_dir",
    "input_sha256",
    "output_names",
    "parse_shard",
    "safe_case_name",
    "select_shard",
]

# Longest output stem in bytes: leaves room for "_probabilities.nii.gz" under the common 255-byte
# file-name limit.
MAX_NAME_BYTES = 200
# Bytes per read while hashing inputs: 8 MiB keeps memory flat for large scans.
REPORT_NAME = "report.json"


def safe_case_name(case_id: str) -> str:
    """A file-name stem for ``case_id`` that stays inside the output folder.

    Path separators, NUL and control characters become ``_``; a leading ``-`` or ``.`` becomes
    ``_`` (no option-like or hidden names); spaces, shell characters and unicode are kept literally
    (normalised to NFC); an empty result becomes ``case``.
    """
    text = unicodedata.normalize("NFC", str(case_id))
    chars = ["_" if ch in "/\\" or unicodedata.category(ch).startswith("C") else ch for ch in text]
    name = "".join(chars).strip()
    while name and name[0] in ".-":
        name = "_" + name[1:]
    name = name or "case"
    while len(name.encode("utf-8")) > MAX_NAME_BYTES:
        name = name[:-1]
    return name


def output_names(case_ids: Sequence[str], suffixes: Mapping[str, str]) -> dict[str, str]:
    """Map case id -> safe stem, refusing two cases whose output files would share a name.

    Args:
        case_ids: the cases of this run.
        suffixes: case id -> mask suffix (``.nii.gz``, ``.nrrd``, ``.mha``).

    Raises:
        UsageError: two cases, or a case and ``report.json``, would write the same file (compared
            case-insensitively, as on macOS and Windows file systems).
    """
    names = {cid: safe_case_name(cid) for cid in case_ids}
    owners: dict[str, str] = {REPORT_NAME: "(the run report)"}
    clashes = []
    for cid, stem in names.items():
        files = [
            stem + suffixes.get(cid, ".nii.gz"),
            stem + ".json",
            stem + "_probabilities.nii.gz",
            stem + "_probabilities.npz",
        ]
        for file in files:
            key = file.casefold()
            if key in owners and owners[key] != cid:
                clashes.append(f"{cid!r} and {owners[key]!r} -> {file}")
            owners.setdefault(key, cid)
    if clashes:
        raise UsageError(
            "--input",
            "case ids collide after making them safe file names: " + "; ".join(clashes[:10]),
            expected="distinct case ids",
        )
    return names


def check_output_dir(output_dir: str | os.PathLike[str], input_path: str | os.PathLike[str]) -> Path:
    """Create ``output_dir`` and prove it is writable and outside the input tree.

    The input tree is the input folder, or for a single file the folder holding it (a subfolder
    next to the file is allowed, the file's own folder is not).

    Returns:
        The resolved output folder.

    Raises:
        UsageError: output equals or lies inside the input folder, is a file, or is not writable.
    """
    out = Path(output_dir).expanduser().resolve()
    src = Path(input_path).expanduser().resolve()
    if src.is_dir():
        if _inside(out, src):
            raise UsageError(
                output_dir, "output folder is inside the input folder", got=str(out), expected=f"a folder outside {src}"
            )
    elif out == src.parent:
        raise UsageError(
            output_dir,
            "output folder is the input file's folder",
            got=str(out),
            expected=f"another folder than {src.parent}",
        )
    make_output_dir(out)
    return out


def parse_shard(shard: str | tuple[int, int] | None, env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """``"i/n"`` (or ``(i, n)``) as a checked pair; without one, torchrun's RANK/WORLD_SIZE.

    Raises:
        UsageError: malformed text, n < 1, or i outside 0..n-1.
    """
    env = os.environ if env is None else env
    if shard is None:
        if "RANK" in env and "WORLD_SIZE" in env:
            shard = f"{env['RANK']}/{env['WORLD_SIZE']}"
        else:
            return None
    if isinstance(shard, str):
        parts = shard.split("/")
        try:
            index, count = int(parts[0]), int(parts[1])
            if len(parts) != 2:
                raise ValueError
        except (ValueError, IndexError):
            raise UsageError(
                "--shard", "malformed shard", got=shard, expected="i/n with 0 <= i < n, e.g. 0/4"
            ) from None
    else:
        index, count = int(shard[0]), int(shard[1])
    if count < 1 or not 0 <= index < count:
        raise UsageError("--shard", "shard index out of range", got=f"{index}/{count}", expected="i/n with 0 <= i < n")
    return index, count


def select_shard(case_ids: Sequence[str], shard: tuple[int, int] | None) -> list[str]:
    """Every n-th case id (sorted) starting at i; all of them without a shard."""
    ordered = sorted(case_ids)
    if shard is None:
        return ordered
    index, count = shard
    return ordered[index::count]


# sha256 of an input file, or of a DICOM folder's files (one implementation, in medgn.files).
input_sha256 = path_sha256


@dataclass
class CaseResult:
    """What happened to one case.

    Attributes:
        case_id: the id from the input.
        name: the safe output stem.
        status: ``ok``, ``skipped`` or ``failed``.
        code: exit-code category of the failure (None unless failed).
        message: the one-line error, or why the case was skipped.
        seconds: wall time spent on the case.
        outputs: files written (names inside the output folder).
        warnings: things the user should know (e.g. the CPU-stitching fallback).
    """

    case_id: str
    name: str
    status: str
    code: int | None = None
    message: str = ""
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class InferenceReport:
    """The outcome of a run: one :class:`CaseResult` per case of this shard."""

    output_dir: Path
    cases: list[CaseResult] = field(default_factory=list)
    shard: tuple[int, int] | None = None
    models: list[dict[str, str]] = field(default_factory=list)

    @property
    def failed(self) -> list[CaseResult]:
        """The failed cases."""
        return [c for c in self.cases if c.status == "failed"]

    @property
    def exit_code(self) -> int:
        """0 when every case succeeded or was skipped, else the highest failure category."""
        codes = [c.code or 1 for c in self.failed]
        return max(codes) if codes else EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form written to ``report.json``."""
        counts = {s: sum(c.status == s for c in self.cases) for s in ("ok", "skipped", "failed")}
        return {
            "output_dir": str(self.output_dir),
            "shard": list(self.shard) if self.shard else None,
            "models": self.models,
            "counts": counts,
            "exit_code": self.exit_code,
            "cases": [asdict(c) for c in self.cases],
        }

    def write(self) -> Path:
        """Write ``report.json`` (``report-<i>of<n>.json`` for a shard) atomically."""
        name = REPORT_NAME if self.shard is None else f"report-{self.shard[0]}of{self.shard[1]}.json"
        return atomic_write_json(self.output_dir / name, self.to_dict())
