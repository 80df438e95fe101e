"""Inference bookkeeping: safe output names, output checks, shards, hashes and the report.

This module owns everything :func:`medgn.infer.run.infer` decides before a model is loaded and
what it records after each case: case ids turned into file names that cannot leave the output
folder (separators replaced, no leading ``-`` or ``.``, unicode kept, collisions refused), an
``--output`` that names one mask file instead of a folder, the refusal to write into the input
tree, over the input or into an unwritable folder, the ``--shard i/n`` selection
(also from torchrun's ``RANK``/``WORLD_SIZE``), input sha256s, the per-case result record and the
``report.json`` summary with the overall exit code.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medgn.data.preflight import MASK_SUFFIXES
from medgn.environment import RENDEZVOUS_VARS
from medgn.errors import EXIT_OK, UsageError
from medgn.files import NAME_MAX, atomic_write_json, make_output_dir, path_sha256
from medgn.files import is_inside as _inside

__all__ = [
    "CaseResult",
    "InferenceReport",
    "MaskFile",
    "check_mask_file",
    "check_output_dir",
    "mask_file",
    "input_sha256",
    "output_names",
    "parse_shard",
    "report_name",
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


def output_names(
    case_ids: Sequence[str], suffixes: Mapping[str, str], shard: tuple[int, int] | None = None
) -> dict[str, str]:
    """Map case id -> safe stem, refusing two cases whose output files would share a name.

    Args:
        case_ids: the cases of this run.
        suffixes: case id -> mask suffix (``.nii.gz``, ``.nrrd``, ``.mha``).
        shard: ``(i, n)`` when the run is one of n shards: every shard's report name is reserved
            too (the shards share the output folder).

    Raises:
        UsageError: two cases, or a case and ``report.json`` (or a shard's report), would write the
            same file (compared case-insensitively, as on macOS and Windows file systems).
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
            shard_report = re.fullmatch(r"report-(\d+)of(\d+)\.json", key)
            if (
                shard
                and shard_report
                and int(shard_report[1]) < shard[1]
                and key == report_name((int(shard_report[1]), shard[1]))
            ):
                clashes.append(f"{cid!r} and a shard's run report -> {file}")
            elif key in owners and owners[key] != cid:
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


@dataclass(frozen=True)
class MaskFile:
    """An ``--output`` that names the mask of a single case: its folder, stem and suffix.

    The case's other outputs sit beside it with the same stem (``<stem>.json``, the DICOM-SEG
    ``<stem>.seg.dcm``, ``<stem>_probabilities.npz``); no ``report.json`` is written.
    """

    folder: Path
    stem: str
    suffix: str

    @property
    def path(self) -> Path:
        """The mask's path."""
        return self.folder / (self.stem + self.suffix)


# File names that are not a folder's and not a mask medgn can write: refused rather than made into a
# folder of that name.
NOT_MASK_SUFFIXES = (
    ".gz",
    ".bz2",
    ".zip",
    ".mhd",
    ".nhdr",
    ".hdr",
    ".img",
    ".npy",
    ".npz",
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
    ".json",
    ".txt",
    ".csv",
    ".h5",
    ".pt",
    ".pth",
    ".onnx",
)


def mask_file(output: str | os.PathLike[str]) -> MaskFile | None:
    """The mask file ``output`` names, or None when it names an output folder.

    A path ending in a mask suffix (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``, any case) that is
    not an existing folder names a file; one ending in another file suffix (``.txt``, ``.mhd``,
    ``.png``: :data:`NOT_MASK_SUFFIXES`) is refused; anything else is a folder.

    Raises:
        UsageError: the name ends in ``.dcm`` (a DICOM-SEG is named after its case in a folder)
            or in a file suffix medgn writes no mask in, or the suffix is all there is (``.nii.gz``).
    """
    path = Path(output).expanduser()
    name = path.name
    lower = name.lower()
    if lower.endswith(".dcm") and not path.is_dir():
        raise UsageError(
            "--output",
            "a DICOM-SEG cannot be named on its own",
            got=str(output),
            expected="an output folder (the SEG is written there as <case>.seg.dcm), or a .nii.gz mask name",
        )
    suffix = next((s for s in MASK_SUFFIXES if lower.endswith(s)), None)
    folder_asked = path.is_dir() or str(output).endswith(("/", os.sep))  # a trailing / means a folder
    if suffix is None and lower.endswith(NOT_MASK_SUFFIXES) and not folder_asked:
        raise UsageError(
            "--output",
            "medgn writes no mask in this format",
            got=str(output),
            expected="a mask name ending in .nii.gz, .nii, .nrrd or .mha, or an output folder",
        )
    if suffix is None or folder_asked:
        return None
    if len(name) == len(suffix):
        raise UsageError("--output", "mask file name has no stem", got=str(output), expected="e.g. mask.nii.gz")
    folder = path.parent.resolve()
    return MaskFile(folder, name[: -len(suffix)], name[-len(suffix) :])


def check_mask_file(target: MaskFile, input_path: str | os.PathLike[str]) -> Path:
    """Create the mask file's folder and prove it is writable and that no output lands on the input.

    Unlike an output folder, the mask may sit beside its input file; it may not replace it, and
    none of the case's outputs may land inside an input folder (a DICOM series folder, whose next
    read would find them).

    Returns:
        The resolved folder.

    Raises:
        UsageError: an output would replace the input file or lie inside the input folder, or the
            folder cannot be made.
    """
    src = Path(input_path).expanduser().resolve()
    if src.is_dir() and _inside(target.folder, src):
        raise UsageError(
            "--output",
            "mask file is inside the input folder",
            got=str(target.path),
            expected=f"a path outside {src}",
        )
    outputs = [target.path, *(target.folder / (target.stem + s) for s in (".json", "_probabilities.npz"))]
    longest = max(outputs, key=lambda p: len(os.fsencode(p.name)))
    if len(os.fsencode(longest.name)) > NAME_MAX:
        raise UsageError(
            "--output",
            "mask name too long for the files written beside it",
            got=f"{longest.name[:40]}... ({len(os.fsencode(longest.name))} bytes)",
            expected=f"a name whose stem has at most {NAME_MAX - len('_probabilities.npz')} bytes",
        )
    if src.is_file() and any(p == src or (p.exists() and os.path.samefile(p, src)) for p in outputs):
        raise UsageError(
            "--output", "output would replace the input file", got=str(target.path), expected="another file name"
        )
    make_output_dir(target.folder)
    return target.folder


def parse_shard(shard: str | tuple[int, int] | None, env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """``"i/n"`` (or ``(i, n)``) as a checked pair; without one, torchrun's RANK/WORLD_SIZE.

    Raises:
        UsageError: malformed text, n < 1, or i outside 0..n-1; RANK/WORLD_SIZE of several processes
            without MASTER_ADDR/MASTER_PORT (variables left in a shell: the run would do a share).
    """
    env = os.environ if env is None else env
    source = "--shard"
    if shard is None:
        if "RANK" in env and "WORLD_SIZE" in env:
            shard, source = f"{env['RANK']}/{env['WORLD_SIZE']}", "RANK/WORLD_SIZE"
            missing = [name for name in RENDEZVOUS_VARS if not env.get(name)]
            if missing and env["WORLD_SIZE"].strip() != "1":  # left over in a shell, not set by torchrun
                raise UsageError(
                    source,
                    "set without torchrun's rendezvous address: this process would segment only its share",
                    got=f"RANK={env['RANK']} WORLD_SIZE={env['WORLD_SIZE']}, {' and '.join(missing)} unset",
                    expected="a torchrun launch, --shard i/n, or unset RANK and WORLD_SIZE",
                )
        else:
            return None
    if isinstance(shard, str):
        parts = shard.split("/")
        try:
            index, count = int(parts[0]), int(parts[1])
            if len(parts) != 2:
                raise ValueError
        except (ValueError, IndexError):
            if source != "--shard":
                raise UsageError(
                    source, "torchrun's environment variables are not integers", got=shard, expected="RANK < WORLD_SIZE"
                ) from None
            raise UsageError(
                "--shard", "malformed shard", got=shard, expected="i/n with 0 <= i < n, e.g. 0/4"
            ) from None
    else:
        index, count = int(shard[0]), int(shard[1])
    if count < 1 or not 0 <= index < count:
        raise UsageError(source, "shard index out of range", got=f"{index}/{count}", expected="i/n with 0 <= i < n")
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
    mask_file: Path | None = None  # the mask --output named: no report.json then (the sidecar is the record)

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

    def write(self) -> Path | None:
        """Write ``report.json`` (``report-<i>of<n>.json`` for a shard) atomically.

        A run that wrote one named mask file writes none: its folder may be shared with other runs
        and masks, and the mask's sidecar already holds the case's record.
        """
        if self.mask_file is not None:
            return None
        return atomic_write_json(self.output_dir / report_name(self.shard), self.to_dict())


def report_name(shard: tuple[int, int] | None) -> str:
    """``report.json``, or ``report-<i>of<n>.json`` for a shard."""
    return REPORT_NAME if shard is None else f"report-{shard[0]}of{shard[1]}.json"
