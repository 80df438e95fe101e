"""Run every benchmark script in this folder (``make bench``), one after another.

Each ``bench_*.py`` script measures what it can on this machine (GPU benchmarks say so and exit
when no CUDA device is present) and writes its CSV/JSON to ``benchmarks/results/``. Extra
arguments are passed to every script; a failing script makes the whole run fail.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    failed = []
    for script in sorted(HERE.glob("bench_*.py")):
        print(f"== {script.name}", flush=True)
        proc = subprocess.run([sys.executable, str(script), *argv], check=False)
        if proc.returncode != 0:
            failed.append(script.name)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
