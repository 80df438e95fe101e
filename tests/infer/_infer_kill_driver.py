"""Run ``medgn infer`` in a subprocess; with HANG_AT=n it stops forever inside the n-th mask write.

The hang happens after the writer has filled its temporary file and before the rename, so a
SIGKILL then leaves exactly what a crash mid-write leaves: a temp file, no final file.
Usage: python _infer_kill_driver.py <medgn infer arguments...>
"""

from __future__ import annotations

import os
import sys
import time

import torch

torch.set_num_threads(1)  # the same thread count as the in-process reference run

from medgn.cli import main  # noqa: E402
from medgn.data import io  # noqa: E402

HANG_AT = int(os.environ.get("HANG_AT", "0"))
_calls = {"n": 0}
_original_write = io._write


def _write(*args: object, **kwargs: object) -> None:
    _original_write(*args, **kwargs)
    _calls["n"] += 1
    if _calls["n"] == HANG_AT:
        while True:  # wait here until the test kills the process
            time.sleep(0.05)


io._write = _write
sys.exit(main(sys.argv[1:]))
