"""Logging: console output for people, a log file per run for tracebacks and details.

The CLI prints one line per user error; the full traceback of any failure goes to the run's log
file (``<out>/medgn.log`` once a command knows its output folder, otherwise a per-user file in the
temporary directory). Libraries log through ``logging.getLogger("medgn.<module>")``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

LOGGER_NAME = "medgn"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_logger(name: str = LOGGER_NAME) -> logging.Logger:
    """The medgn logger (or a child of it)."""
    return logging.getLogger(name if name.startswith(LOGGER_NAME) else f"{LOGGER_NAME}.{name}")


def fallback_log_path() -> Path:
    """Where tracebacks go before a command has an output folder."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"medgn-{uid}.log"


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
