"""Logging: console output for people, a log file per run for tracebacks and details.

The CLI prints one line per user error; the full traceback of any failure goes to the run's log
file (``<out>/medgn.log`` once a command knows its output folder, otherwise a file of the process in
the temporary directory). Libraries log through ``logging.getLogger("medgn.<module>")``.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import tempfile
import time
from pathlib import Path

LOGGER_NAME = "medgn"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_logger(name: str = LOGGER_NAME) -> logging.Logger:
    """The medgn logger (or a child of it)."""
    return logging.getLogger(name if name.startswith(LOGGER_NAME) else f"{LOGGER_NAME}.{name}")


# This user's fallback logs kept in the temporary directory: the newest 20, and any written to
# within the hour (a run still going); older ones are removed when a process chooses its own.
KEEP_FALLBACK_LOGS = 20
_RECENT_S = 3600.0
_fallback: tuple[int, Path] | None = None  # (pid, path): a forked process chooses its own


_warnings_given = 0


def warn_user(message: str, logger: logging.Logger | None = None) -> None:
    """A warning for the user: one ``medgn: warning:`` line on stderr, and the same in the log."""
    from medgn.errors import printable

    global _warnings_given
    _warnings_given += 1
    (logger or get_logger()).warning(message)
    sys.stderr.write(f"medgn: warning: {printable(message)}\n")


def warnings_given() -> int:
    """How many :func:`warn_user` lines this process has written (a command's summary counts its own)."""
    return _warnings_given


def fallback_log_path() -> Path:
    """Where tracebacks go before a command has an output folder: a file of this process alone.

    ``medgn-<uid>-<date>-<time>-<pid>.log`` in the temporary directory, so the traceback an error
    message points at is not mixed with other runs'. The name is chosen once per process (the file
    appears when a log is attached to it); choosing it removes this user's older fallback logs
    beyond :data:`KEEP_FALLBACK_LOGS`.
    """
    global _fallback
    pid = os.getpid()
    if _fallback is None or _fallback[0] != pid:
        uid = os.getuid() if hasattr(os, "getuid") else 0
        folder = Path(tempfile.gettempdir())
        _prune_fallback_logs(folder, uid)
        _fallback = (pid, folder / f"medgn-{uid}-{time.strftime('%Y%m%d-%H%M%S')}-{pid}.log")
    return _fallback[1]


def _prune_fallback_logs(folder: Path, uid: int) -> None:
    """Remove this user's fallback logs beyond the newest ones, unless written to recently."""
    found = []
    for path in folder.glob(f"medgn-{uid}-*.log"):
        try:
            info = path.lstat()
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode) and (not hasattr(os, "getuid") or info.st_uid == uid):
            found.append((info.st_mtime, path))
    found.sort(reverse=True)
    for mtime, path in found[KEEP_FALLBACK_LOGS:]:
        if time.time() - mtime > _RECENT_S:
            try:
                path.unlink()
            except OSError:  # another process removed it, or the folder is read-only: harmless
                pass


def attach_file_log(path: str | os.PathLike[str]) -> Path:
    """Send medgn's log records (DEBUG and up) to ``path`` as well; returns the path.

    The log file is appended to (it is a journal, not an output), so it does not use the atomic
    writer.
    """
    path = Path(path)
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename) == path.resolve():
            return path
    # backslashreplace: a file name that is not valid UTF-8 (its bytes are surrogates in Python)
    # is written escaped instead of failing the record.
    handler = logging.FileHandler(path, encoding="utf-8", errors="backslashreplace")
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    return path


def current_log_path() -> Path | None:
    """The most recently attached log file, if any."""
    logger = logging.getLogger(LOGGER_NAME)
    files = [h for h in logger.handlers if isinstance(h, logging.FileHandler)]
    return Path(files[-1].baseFilename) if files else None


def detach_file_logs() -> None:
    """Close and remove every file handler (used between runs in one process, e.g. tests)."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        if isinstance(handler, logging.FileHandler):
            handler.close()
            logger.removeHandler(handler)
