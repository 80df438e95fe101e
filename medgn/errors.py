"""User-facing errors and their exit-code categories.

Every error medgn reports to a user is a :class:`MedgnError` carrying a category that the CLI turns
into the process exit code (2 usage/config, 3 invalid input data, 4 invalid model or checkpoint,
5 resources, 6 output locked by another run; 1 is reserved for bugs). The message is one line:
``<where>: <what is wrong> (<got>, expected <rule>)``, so a user sees the file or key, the problem
and how to fix it without a traceback.
"""

from __future__ import annotations

import errno
import os
from typing import Any

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_MODEL = 4
EXIT_RESOURCE = 5
EXIT_LOCKED = 6
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader left (| head)


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\x1b``) and undecodable bytes shown.

    File and case names come from users' disks: one holding a newline or a terminal escape must not
    split medgn's one-line error or recolour the terminal.
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def brief(text: object, width: int = 200) -> str:
    """A library's message on one line, cut to ``width`` characters at a word boundary (``...`` marks a cut)."""
    line = " ".join(str(text).split())
    if len(line) <= width:
        return line
    cut = line[: width - 4]
    space = cut.rfind(" ")
    return (cut[:space] if space > width // 2 else cut) + " ..."


# What an allocation failure says when it is not a MemoryError: PyTorch's CPU allocator raises
# RuntimeError("DefaultCPUAllocator: can't allocate memory ..." or "... not enough memory ..."),
# CUDA torch.OutOfMemoryError("CUDA out of memory ..."), the C library "Cannot allocate memory".
OUT_OF_MEMORY_TEXT = ("can't allocate memory", "cannot allocate memory", "not enough memory", "out of memory")


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the file system is full or over quota (exit 5, not a bug)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def out_of_memory(exc: BaseException | None) -> BaseException | None:
    """The exception in ``exc``'s chain (itself, then its causes and contexts) saying memory ran out.

    A library often wraps the failure (MONAI: ``RuntimeError: applying transform ...`` from the
    MemoryError), so the whole chain is searched. Returns None when no link is an out-of-memory
    error: a MemoryError, an OSError with ``ENOMEM``, or a RuntimeError whose message says so.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM):
            return exc
        if isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in OUT_OF_MEMORY_TEXT):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


class MedgnError(Exception):
    """An error a user can act on.

    Args:
        where: the file path or configuration key involved ("" when none applies).
        what: what is wrong, in plain words.
        got: the offending value, shown as given (optional).
        expected: the rule the value should satisfy (optional).
        code: exit-code category; subclasses fix it.
    """

    code: int = EXIT_USAGE

    def __init__(
        self,
        where: str | os.PathLike[str],
        what: str,
        *,
        got: Any = None,
        expected: str | None = None,
        code: int | None = None,
    ) -> None:
        self.where = os.fspath(where) if where is not None else ""
        self.what = what
        self.got = got
        self.expected = expected
        if code is not None:
            self.code = code
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """The message without the ``medgn: error:`` prefix, on a single line."""
        detail = []
        if self.got is not None:
            detail.append(f"got {self.got!r}" if not isinstance(self.got, str) else f"got {self.got}")
        if self.expected is not None:
            detail.append(f"expected {self.expected}")
        text = self.what
        if detail:
            text += " (" + ", ".join(detail) + ")"
        text = printable(" ".join(text.splitlines()))  # library messages: their lines joined
        return f"{printable(self.where)}: {text}" if self.where else text


class UsageError(MedgnError):
    """Bad command line or configuration (exit code 2)."""

    code = EXIT_USAGE


class InputDataError(MedgnError):
    """An image, label or dataset description that cannot be used (exit code 3)."""

    code = EXIT_INPUT


class ModelError(MedgnError):
    """A model or checkpoint that is invalid or does not match the data (exit code 4)."""

    code = EXIT_MODEL


class ResourceError(MedgnError):
    """Out of memory, disk, or beyond a configured limit (exit code 5)."""

    code = EXIT_RESOURCE


class LockedError(MedgnError):
    """The output folder is in use by another run (exit code 6)."""

    code = EXIT_LOCKED
