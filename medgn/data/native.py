"""What the C++ image libraries print: caught and turned into the reason of medgn's one-line error.

ITK's MetaIO and GDCM write diagnostics for corrupt files straight to file descriptor 2, where they
would appear next to the single ``medgn: error:`` line. This module owns
:func:`captured_native_stderr`, which catches that output around a read, and :func:`itk_reason`,
which picks a short reason from it or from ITK's exception text.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from collections.abc import Iterator

# File descriptor 2 is shared by the whole process: one capture at a time, or two threads could
# restore each other's redirection.
_FD2_LOCK = threading.Lock()


@contextlib.contextmanager
def captured_native_stderr() -> Iterator[list[str]]:
    """Catch what C++ readers (ITK's MetaIO, GDCM) print straight to file descriptor 2.

    A corrupt file would otherwise put library chatter next to medgn's one-line error. The text is
    yielded (filled on exit) so that the caller can quote it in the error it raises.
    """
    lines: list[str] = []
    with _FD2_LOCK:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no usable fd 2 (embedded interpreters): nothing to catch
            saved = -1
        if saved < 0:
            yield lines
            return
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield lines
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                sink.seek(0)
                text = sink.read(4096).decode("utf-8", "replace")  # 4 KiB: enough to quote, never a flood
                lines.extend(line.strip() for line in text.splitlines() if line.strip())


def itk_reason(exc: BaseException, native: list[str]) -> str:
    """A short reason for an ITK failure: what the library printed, else its error line."""
    if native:
        lines = [line.strip() for line in native if line.strip()]
        distinct = list(dict.fromkeys(lines))  # a decoder repeats itself, once per frame
        repeats = len(lines) - len(distinct)
        return (" ".join(distinct) + (f" (and {repeats} repeated lines)" if repeats else ""))[:200]
    text = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line.split("): ", 1)[-1] for line in text if "ERROR" in line]
    return (errors[0] if errors else text[-1] if text else type(exc).__name__)[:200]
