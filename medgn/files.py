"""Atomic file writes and the output-folder run lock.

Every file medgn writes (volumes, JSON, checkpoints, reports, plots) goes through
:func:`atomic_path`: the writer fills a temporary file in the destination folder, the file is
fsynced and renamed over the final name with ``os.replace``. "The file exists" therefore always
means "the file is complete"; on any failure the temporary file is removed and an earlier file at the
final path is left untouched. A full disk becomes a :class:`~medgn.errors.ResourceError` (exit 5)
naming the file. :class:`RunLock` keeps two runs from writing into one output folder.
:func:`file_sha256`, :func:`path_sha256` and :func:`json_sha256` are the one implementation of
hashing a file, an input (a file or a DICOM folder) and a JSON-able record.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from medgn.errors import LockedError, ResourceError, UsageError, disk_full

TEMP_MARK = ".medgn-tmp-"
LOCK_NAME = ".medgn.lock"

# Files are hashed in 8 MiB chunks: large enough for full disk throughput, small enough to keep
# memory flat for multi-GB checkpoints and volumes.
HASH_CHUNK = 8 << 20

# Multi-part suffixes that writers (nibabel, SimpleITK) read the format from: the temporary
# name must end with the same suffix as the final name.
_COMPOUND_SUFFIXES = (".nii.gz", ".tar.gz", ".seg.nrrd")


def split_suffix(name: str) -> tuple[str, str]:
    """Split ``case.nii.gz`` into ``("case", ".nii.gz")``; other names at their last dot."""
    lower = name.lower()
    for suffix in _COMPOUND_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], name[-len(suffix) :]
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        return name, ""
    return stem, "." + ext


NAME_MAX = 255  # bytes in one file name (Linux file systems)
# A temporary file is named TEMP_MARK + 12 hex digits + "-" + (its final name, fitted to what is left).
TEMP_ROOM = NAME_MAX - len(TEMP_MARK) - 13


def fit_name(name: str, room: int = NAME_MAX) -> str:
    """``name`` when it takes at most ``room`` bytes; else its stem cut short, a digest of the whole
    name and its suffix (kept: writers choose the format by it), unique and within ``room``."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= room:
        return name
    stem, suffix = split_suffix(name)
    digest = hashlib.sha256(raw).hexdigest()[:16]
    keep = max(room - len(suffix.encode("utf-8", "surrogateescape")) - len(digest) - 1, 0)
    cut = stem.encode("utf-8", "surrogateescape")[:keep].decode("utf-8", "ignore")
    return f"{cut}-{digest}{suffix}"


def is_inside(child: str | os.PathLike[str], parent: str | os.PathLike[str]) -> bool:
    """True when ``child`` is ``parent`` or lies under it, after resolving symlinks and ``..``.

    The one rule for "output inside input" (train, infer, evaluate, plan): a link cannot smuggle
    an output folder into the input tree.
    """
    child_r, parent_r = Path(os.path.realpath(child)), Path(os.path.realpath(parent))
    return child_r == parent_r or parent_r in child_r.parents


def path_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is not a regular file or a folder, in words for an error message; None if it is one.

    "not found", "a symbolic link that leads nowhere", or, for what exists but is neither,
    "neither a regular file nor a folder (a FIFO, socket or device)": reading such a path could
    block or never end, so it is named rather than opened.
    """
    path = Path(path)
    if path.is_file() or path.is_dir():
        return None
    if path.is_symlink() and not path.exists():
        return "a symbolic link that leads nowhere"
    if path.exists():
        return "neither a regular file nor a folder (a FIFO, socket or device)"
    return "not found"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def path_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of an input: a file's bytes, or a folder's files (names and bytes, sorted by name)."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        digest.update(file.name.encode("utf-8") + b"\0")
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(HASH_CHUNK), b""):
                digest.update(chunk)
    return digest.hexdigest()


def json_sha256(obj: Any, *, compact: bool = True) -> str:
    """Hex sha256 of a JSON-able record with sorted keys (``compact``: no spaces after separators)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":") if compact else None, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def missing_folders(path: str | os.PathLike[str]) -> list[Path]:
    """``path`` and those of its ancestors that do not exist yet, deepest first."""
    missing: list[Path] = []
    current = Path(path).expanduser().absolute()
    while not os.path.lexists(current) and current != current.parent:
        missing.append(current)
        current = current.parent
    return missing


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove each of ``folders`` in order if it is empty (a refused run's own folders); never raises."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def make_output_dir(path: str | os.PathLike[str], what: str = "output folder") -> Path:
    """Create ``path`` (and parents) and check that files can be written in it.

    Raises:
        UsageError: it exists and is not a folder, or cannot be created or written (read-only
            file system, permissions, a parent that is a file); exit 2, before any work.
        ResourceError: its file system is full or over quota (exit 5).
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(path, f"{what} exists and is not a folder", expected="a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f"{TEMP_MARK}{uuid.uuid4().hex[:12]}-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        if disk_full(exc):
            raise ResourceError(path, f"no space left on device in the {what}", expected="free disk space") from None
        raise UsageError(
            path, f"{what} is not writable ({exc.strerror or exc})", expected="a writable folder"
        ) from None
    return out


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(folder: Path) -> None:
    """Make the names in ``folder`` (a rename, a new file) durable, where the file system can."""
    with contextlib.suppress(OSError):  # not every file system can fsync a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success it becomes ``final`` atomically.

    Args:
        final: destination path. Its folder must exist.
        overwrite: when False and ``final`` exists, refuse with a usage error before writing.

    Raises:
        ResourceError: the disk is full or over quota while writing (exit code 5).
        UsageError: ``final`` exists and ``overwrite`` is False, or exists and is not a regular
            file (a folder, FIFO, device or a link that leads nowhere is never replaced).
    """
    final = Path(final)
    _refuse_special(final)
    if not overwrite and final.exists():
        raise UsageError(final, "output exists", expected="a new path, or pass --overwrite")
    tmp = final.with_name(f"{TEMP_MARK}{uuid.uuid4().hex[:12]}-{fit_name(final.name, TEMP_ROOM)}")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"writer produced no file at {tmp}")
        os.chmod(tmp, _umask_mode())  # mkstemp-style 0600 would surprise users
        _fsync_file(tmp)
        _refuse_special(final)  # again: the path may have changed while the file was written
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as exc:
        _remove_quietly(tmp)
        if disk_full(exc):
            raise ResourceError(final, "no space left on device while writing", expected="free disk space") from exc
        raise
    except RuntimeError as exc:
        # Writers in C++ (torch.save's zip writer) report a full disk as a RuntimeError ("unexpected
        # pos ..."): judged by the space left while the partial file still holds what it took.
        full = _nearly_full(final.parent)
        _remove_quietly(tmp)
        if full:
            raise ResourceError(final, "no space left on device while writing", expected="free disk space") from exc
        raise
    except BaseException:
        _remove_quietly(tmp)
        raise


def _refuse_special(final: Path) -> None:
    """Refuse a destination that exists and is not a regular file (as root, ``os.replace`` would
    turn ``/dev/full`` or a FIFO another program reads into a plain file)."""
    if os.path.lexists(final) and not final.is_file():
        raise UsageError(
            final,
            f"output path exists and is {path_problem(final) or 'a folder'}; only a regular file is replaced",
            expected="another output path",
        )


def _nearly_full(folder: Path) -> bool:
    """Less than 1 MiB free on ``folder``'s file system (False when that cannot be asked)."""
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _write_bytes_to(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()


def atomic_write_bytes(final: str | os.PathLike[str], data: bytes, *, overwrite: bool = True) -> Path:
    """Write ``data`` to ``final`` atomically and return the final path."""
    with atomic_path(final, overwrite=overwrite) as tmp:
        _write_bytes_to(tmp, data)
    return Path(final)


def atomic_write_text(final: str | os.PathLike[str], text: str, *, overwrite: bool = True) -> Path:
    """Write UTF-8 ``text`` to ``final`` atomically."""
    return atomic_write_bytes(final, text.encode("utf-8"), overwrite=overwrite)


def atomic_write_json(final: str | os.PathLike[str], obj: Any, *, overwrite: bool = True) -> Path:
    """Write ``obj`` as indented JSON (NaN/Infinity refused: they are not JSON)."""
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    return atomic_write_text(final, text, overwrite=overwrite)


def atomic_write_with(final: str | os.PathLike[str], writer: Callable[[Path], None], *, overwrite: bool = True) -> Path:
    """Call ``writer(tmp_path)`` (e.g. ``nib.save``, ``torch.save``) and publish atomically."""
    with atomic_path(final, overwrite=overwrite) as tmp:
        writer(tmp)
    return Path(final)


def clean_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove temporary files (and staging folders) an interrupted run left in ``folder``; return them."""
    removed = []
    folder = Path(folder)
    if folder.is_dir():
        for path in folder.iterdir():
            if not path.name.startswith(TEMP_MARK):
                continue
            if path.is_file():
                _remove_quietly(path)
                removed.append(path)
            elif path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


# Lock files held by this process. A forked child (a DataLoader worker) closes its copies at once:
# an flock lasts while any process holds the file open, so a worker outliving a killed run would
# keep the run's folder locked for the seconds it takes to notice.
_HELD_LOCKS: set[int] = set()


def _close_held_locks_in_child() -> None:
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_locks_in_child)


class RunLock:
    """An exclusive lock on an output folder, held by one run at a time.

    The lock is a file in the folder holding pid, host, start time and purpose (for the message a
    second run gets), locked with ``flock`` while the run holds it. The kernel releases that lock
    when its process ends however it ends (``kill -9``, a crash), so a file left behind is simply
    taken over, with no guess from process ids, and two runs can never both hold it: the one that
    locks a file that is no longer at the path (its holder released it) tries again. Use as a
    context manager. ``name`` picks another lock file, for runs that own only part of a folder
    (one mask file).
    """

    def __init__(self, folder: str | os.PathLike[str], purpose: str = "run", name: str = LOCK_NAME) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.purpose = purpose
        self.stale_removed: dict[str, Any] | None = None  # what a dead holder had written, when taken over
        self._fd: int | None = None

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _locked(self) -> LockedError:
        holder = self._read()
        return LockedError(
            self.folder,
            "output folder is in use by another medgn run",
            got=f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}",
            expected="wait for it to finish (its lock ends with that process, however it ends)",
        )

    def acquire(self) -> RunLock:
        import fcntl

        if not self.folder.is_dir():
            raise UsageError(self.folder, "output folder does not exist", expected="an existing folder")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "purpose": self.purpose}
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            except OSError as exc:
                raise UsageError(
                    self.folder, f"cannot create lock file ({exc.strerror})", expected="a writable folder"
                ) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._locked() from None
            except OSError as exc:
                os.close(fd)
                raise UsageError(
                    self.path, f"cannot lock the file ({exc.strerror})", expected="a file system with file locks"
                ) from exc
            try:  # the holder may have released (unlinked) it between our open and our lock
                here = os.stat(self.path)
                mine = os.fstat(fd)
                current = (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)
            except FileNotFoundError:
                current = False
            if not current:
                os.close(fd)
                continue
            left = os.read(fd, 65536)
            if left:  # written by a run that ended without releasing it (killed)
                try:
                    previous = json.loads(left.decode("utf-8"))
                except ValueError:
                    previous = {}
                self.stale_removed = previous if isinstance(previous, dict) else {}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
            self._fd = fd
            _HELD_LOCKS.add(fd)
            return self
        raise LockedError(self.folder, "could not take the output-folder lock", expected="one run per folder")

    def release(self) -> None:
        if self._fd is None:
            return
        try:  # unlinked while still locked: a run that opens the path from now on makes a new file
            here, mine = os.stat(self.path), os.fstat(self._fd)
            if (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino):
                _remove_quietly(self.path)
        except OSError:
            pass
        finally:
            _HELD_LOCKS.discard(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
