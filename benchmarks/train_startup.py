"""Time from ``medgn train`` start to the first training step, and volume reads before it.

Runs the real ``medgn train`` command in this process with two probes: the pixel reader counts
reads per file and the trainer's ``train_step`` stops the process at its first call, printing the
wall and CPU seconds since this script started and the read counts as one JSON line. Works on the current
layout (``medgn.train.trainer``) and the older one (``medgn.engine.trainer``).

usage: python benchmarks/train_startup.py DATASET CONFIG [medgn train options...]
"""

from __future__ import annotations

import time

START = time.perf_counter()

import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402


def main() -> None:
    dataset, config, *extra = sys.argv[1:]
    import medgn.data.io as io

    try:
        trainer_mod = importlib.import_module("medgn.train.trainer")
    except ImportError:
        trainer_mod = importlib.import_module("medgn.engine.trainer")
    reads: Counter = Counter()
    read_pixels = io._read_pixels

    def counting(info, *args, **kwargs):  # type: ignore[no-untyped-def]
        reads[str(info.path)] += 1
        return read_pixels(info, *args, **kwargs)

    def first_step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        seconds = time.perf_counter() - START
        # CPU seconds of this process: unlike wall time, barely affected by other work on the core.
        usage = resource.getrusage(resource.RUSAGE_SELF)
        per_volume = Counter(reads.values())
        print(
            json.dumps(
                {
                    "seconds_to_first_step": round(seconds, 2),
                    "cpu_seconds_to_first_step": round(usage.ru_utime + usage.ru_stime, 2),
                    "volumes": len(reads),
                    "reads": sum(reads.values()),
                    "volumes_by_read_count": dict(sorted(per_volume.items())),
                }
            ),
            flush=True,
        )
        os._exit(0)  # the measurement ends at the first step

    io._read_pixels = counting
    trainer_mod.Trainer.train_step = first_step
    from medgn.cli import main as cli

    with tempfile.TemporaryDirectory() as tmp:
        cli(
            [
                "train",
                "--config",
                config,
                "--data",
                dataset,
                "--out",
                str(Path(tmp) / "run"),
                "--no-progress",
                "--device",
                "cpu",
                *extra,
            ]
        )


if __name__ == "__main__":
    main()
