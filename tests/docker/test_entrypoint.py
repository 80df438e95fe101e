"""The image's ``medgn`` wrapper (docker/entrypoint.py), run in the virtual environment.

In a container medgn is PID 1, which ignores SIGTERM unless a handler is installed; the wrapper
installs one. Checked here without a Docker engine: the wrapper passes arguments and exit codes
through, and a SIGTERM stops a running command cleanly with exit code 143 instead of being ignored.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WRAPPER = REPO / "docker" / "entrypoint.py"
DATA = REPO.parent / "shared" / "data"


def _wrapper(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUTF8": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, str(WRAPPER), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )  # type: ignore[call-overload]


def test_passes_arguments_and_exit_codes_through(tmp_path: Path) -> None:
    proc = _wrapper("--help")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.startswith("usage: medgn"), err
    proc = _wrapper("verify", str(tmp_path / "missing"))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode not in (0, 1, 143), (proc.returncode, err)
    assert err.startswith("medgn: error:"), err


@pytest.mark.data
@pytest.mark.skipif(not (DATA / "LA2018").is_dir(), reason="no LA2018 in ../shared/data")
def test_sigterm_stops_a_running_command_with_143() -> None:
    # verify of 80 real cases takes far longer than the wait below: the signal lands mid-run.
    proc = _wrapper("verify", str(DATA / "LA2018"))
    time.sleep(4)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, (proc.returncode, err[-2000:])
    assert time.monotonic() - t0 < 20
    assert "Traceback" not in err
