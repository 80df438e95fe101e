"""Detached data files of NRRD and MetaImage headers: resolved and kept inside the header's folder.

A MetaImage header (``.mha``/``.mhd``) names its voxel data in ``ElementDataFile`` and a NRRD header
(``.nrrd``/``.nhdr``) in ``data file`` (or the old ``datafile``): ``LOCAL`` (MetaImage: data follow
the header), one file name, ``LIST`` followed by one file name per line, or a printf pattern such
as ``slice%03d.raw 1 40 1``. ITK follows whatever is written there, so a header could make medgn
read ``../../elsewhere/x.raw`` or ``/some/absolute/path``. This module owns
:func:`detached_data_files`, which parses the raw header text (no library repairs it), expands lists
and patterns, resolves every name relative to the header's folder with symlinks followed, and
refuses (exit 3, naming the header, the field and the file) any that resolves outside that folder,
is missing, or uses a pattern other than one integer conversion. Field names are matched as the
readers match them (NRRD's without regard to case, MetaImage's with ``=`` or ``:``), and a header
whose data file field could lie beyond the first :data:`MAX_HEADER_BYTES` is refused.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from medgn.errors import InputDataError
from medgn.files import path_sha256

__all__ = ["MAX_DATA_FILES", "detached_data_files", "meta_compressed_stream"]

# Header bytes parsed: real headers are a few KiB; 1 MiB leaves room for a LIST of thousands of
# slice files and bounds what a hostile file costs.
MAX_HEADER_BYTES = 1 << 20
# Most data files one header may name (a LIST or a pattern): more slices than any scanner writes
# (the per-axis limit is 8192), so a larger count means a corrupt or hostile header.
MAX_DATA_FILES = 65536
# One printf integer conversion (flags, width, d or i); "%%" is a literal percent sign.
_INT_CONVERSION = re.compile(r"%[-+ #0]*\d*[di]")
_NRRD_SUFFIXES = (".nrrd", ".nhdr")
_META_SUFFIXES = (".mha", ".mhd")


def _header_lines(path: Path) -> tuple[list[str], bool]:
    """The header's first :data:`MAX_HEADER_BYTES` as lines, and whether that is the whole file.

    When it is not, the last (possibly cut) line is dropped: a name cut short could resolve inside
    the folder while the whole one leads out.
    """
    with open(path, "rb") as handle:
        raw = handle.read(MAX_HEADER_BYTES + 1)
    complete = len(raw) <= MAX_HEADER_BYTES
    lines = raw[:MAX_HEADER_BYTES].decode("latin-1").splitlines()
    return (lines if complete else lines[:-1]), complete


def _too_long(path: Path, what: str) -> InputDataError:
    return InputDataError(
        path, f"header too long: {what} not within its first {MAX_HEADER_BYTES} bytes", expected="a header of a few KiB"
    )


def _pattern_names(path: Path, field: str, tokens: list[str]) -> list[str] | None:
    """Names of a ``<format> <min> <max> <step>`` pattern, or None when ``tokens`` is not one."""
    if len(tokens) < 4:
        return None
    try:
        first, last, step = (int(t) for t in tokens[1:4])
    except ValueError:
        return None
    fmt = tokens[0]
    if len(_INT_CONVERSION.findall(fmt.replace("%%", ""))) != 1 or fmt.replace("%%", "").count("%") != 1:
        raise InputDataError(
            path,
            f"unsupported data file pattern in '{field}'",
            got=fmt,
            expected="exactly one integer conversion such as %03d",
        )
    if step == 0 or (last - first) * step < 0:
        raise InputDataError(
            path,
            f"invalid data file range in '{field}'",
            got=f"{first} {last} {step}",
            expected="min max step with a step towards max",
        )
    count = (last - first) // step + 1
    if count > MAX_DATA_FILES:
        raise InputDataError(path, f"too many data files in '{field}'", got=count, expected=f"<= {MAX_DATA_FILES}")
    return [fmt % i for i in range(first, last + (1 if step > 0 else -1), step)]


def _nrrd_names(path: Path, lines: list[str], complete: bool) -> tuple[str, list[str], bool]:
    for index, line in enumerate(lines[1:], start=1):
        if not line.strip():
            break  # end of an attached NRRD header: the data follow
        if line.startswith("#") or ":=" in line or ":" not in line:
            continue
        key, value = (part.strip() for part in line.split(":", 1))
        # NRRD readers match field names without regard to case ("Data File", "DATAFILE").
        if " ".join(key.lower().split()) not in ("data file", "datafile"):
            continue
        field = key
        tokens = value.split()
        if tokens and tokens[0].upper() == "LIST":
            return field, [name.strip() for name in lines[index + 1 :] if name.strip()], True
        names = _pattern_names(path, field, tokens)
        return field, names if names is not None else [value], False
    else:
        if not complete:  # neither the header's end nor a data file field in what was read
            raise _too_long(path, "its end (a blank line)")
    return "", [], False


# MetaIO reads "Key = Value" and also "Key : Value".
_META_FIELD = re.compile(r"^\s*([^=:]*?)\s*[=:]\s*(.*?)\s*$")


def _meta_names(path: Path, lines: list[str], complete: bool) -> tuple[str, list[str], bool]:
    for index, line in enumerate(lines):
        match = _META_FIELD.match(line)
        if match is None:
            continue
        key, value = match.groups()
        if key.lower() != "elementdatafile":
            continue
        field = "ElementDataFile"
        tokens = value.split()
        if not tokens or tokens[0].upper() == "LOCAL":
            return field, [], False
        if tokens[0].upper() == "LIST":
            # One name per line after the field; each whitespace-separated word is checked too.
            rest = [name.strip() for name in lines[index + 1 :] if name.strip()]
            return field, rest + [word for name in rest for word in name.split() if word != name], True
        names = _pattern_names(path, field, tokens)
        return field, names if names is not None else [value], False
    if not complete:  # ElementDataFile (the last field) may lie beyond what was read
        raise _too_long(path, "ElementDataFile")
    return "", [], False


def detached_data_files(path: str | os.PathLike[str]) -> list[Path]:
    """The data files a NRRD or MetaImage header names, resolved; refused unless inside its folder.

    Args:
        path: a ``.nrrd``, ``.nhdr``, ``.mha`` or ``.mhd`` header (other files: nothing to check).

    Returns:
        The resolved data files (empty when the data are inside the header file).

    Raises:
        InputDataError: a data file resolves outside the header's folder (``..``, an absolute path
            elsewhere, a symlink leading out), is missing, or the list or pattern is invalid.
    """
    path = Path(path)
    lower = path.name.lower()
    if lower.endswith(_NRRD_SUFFIXES):
        field, names, listed = _nrrd_names(path, *_header_lines(path))
    elif lower.endswith(_META_SUFFIXES):
        field, names, listed = _meta_names(path, *_header_lines(path))
    else:
        return []
    if listed and path.stat().st_size > MAX_HEADER_BYTES:  # names beyond what was parsed
        raise InputDataError(
            path,
            f"header with a '{field}' LIST is too large",
            got=f"{path.stat().st_size} bytes",
            expected=f"<= {MAX_HEADER_BYTES} bytes",
        )
    if len(names) > MAX_DATA_FILES:
        raise InputDataError(path, f"too many data files in '{field}'", got=len(names), expected=f"<= {MAX_DATA_FILES}")
    folder = path.parent.resolve()
    resolved = []
    for name in names:
        target = (path.parent / name).resolve()  # an absolute name replaces the folder; symlinks followed
        if target != folder and folder not in target.parents:
            raise InputDataError(
                path,
                f"detached data file leaves the header's folder ('{field}')",
                got=f"{name} -> {target}",
                expected=f"a file inside {folder}",
            )
        if not target.is_file():
            raise InputDataError(
                path,
                f"detached data file not found ('{field}')",
                got=name,
                expected=f"an existing file inside {folder}",
            )
        resolved.append(target)
    return resolved


_META_DATA_LINE = re.compile(rb"^[ \t]*ElementDataFile[ \t]*[=:][^\n]*\n", re.M | re.I)


def meta_compressed_stream(path: str | os.PathLike[str]) -> tuple[Path, int] | None:
    """Where a MetaImage's compressed voxel data start: (file, byte offset), or None.

    None when the header does not say ``CompressedData = True``, or names a list or pattern of
    files. ITK inflates the stream without reporting a short or corrupt one (the missing voxels
    read as zeros), so the preflight inflates it itself from here.
    """
    path = Path(path)
    if not path.name.lower().endswith(_META_SUFFIXES):
        return None
    with open(path, "rb") as handle:
        raw = handle.read(MAX_HEADER_BYTES)
    fields: dict[str, str] = {}
    for line in raw.decode("latin-1").splitlines():
        match = _META_FIELD.match(line)
        if match is not None:
            fields[match.group(1).lower()] = match.group(2)
            if match.group(1).lower() == "elementdatafile":
                break  # the last field: the data follow
    if fields.get("compresseddata", "").strip().lower() != "true":
        return None
    data = fields.get("elementdatafile", "").strip()
    if data.upper() == "LOCAL":
        found = _META_DATA_LINE.search(raw)
        return (path, found.end()) if found else None
    files = detached_data_files(path)
    return (files[0], 0) if len(files) == 1 else None


def with_data_files_sha256(path: str | os.PathLike[str], digest: str) -> str:
    """An input's sha256 (``digest``, of its own bytes) combined with its detached data files'.

    For a ``.mhd``/``.nhdr`` header a changed ``.raw`` is then a changed input; any other input keeps
    ``digest``. A data file outside the header's folder is refused (:func:`detached_data_files`).
    """
    data_files = detached_data_files(path) if Path(path).is_file() else []
    if not data_files:
        return digest
    combined = hashlib.sha256(digest.encode())
    for file in data_files:
        combined.update(path_sha256(file).encode())
    return combined.hexdigest()
