"""Seconds per scan of ``medgn infer`` as users run it: one command per scan, and one per folder.

Every figure is a whole process, start-up included (Python, torch, reading the model), because
that is what a user or a ``docker run`` per scan waits for. With ``--baseline SRC`` the same
commands run from another medgn source tree (e.g. a ``git worktree`` of an older commit) in turn
with this one (A B A B ...), so the ratio holds when the machine's speed drifts, and the two sides'
masks are compared voxel by voxel.

usage: python benchmarks/infer_latency.py --model RUN --scans DIR [--count 8] [--repeats 3]
           [--threads 2] [--baseline SRC] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCAN_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


def _scans(folder: Path, count: int) -> list[Path]:
    scans = sorted(p for p in folder.iterdir() if p.name.lower().endswith(SCAN_SUFFIXES))
    if not scans:
        raise SystemExit(f"infer_latency: no scans in {folder}")
    return scans[:count]


def _run(src: Path, args: list[str], threads: int) -> tuple[float, float]:
    """Wall and CPU seconds of ``python -m medgn <args>`` run from source tree ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "medgn", *args], cwd=src, env=env, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"infer_latency: medgn {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-500:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _infer_args(model: str, source: Path, output: Path, threads: int) -> list[str]:
    return ["infer", "--model", model, "--input", str(source), "--output", str(output), "--threads", str(threads)]


def _differing_voxels(a: Path, b: Path) -> tuple[int, int]:
    import nibabel as nib
    import numpy as np

    x, y = np.asarray(nib.load(str(a)).dataobj), np.asarray(nib.load(str(b)).dataobj)
    return int((x != y).sum()), int(x.size)


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="run folder or checkpoint")
    parser.add_argument("--scans", required=True, type=Path, help="folder of scans")
    parser.add_argument("--count", type=int, default=8, help="scans to segment (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the scans (default 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline", type=Path, help="another medgn source tree, run in turn with this one")
    parser.add_argument("--out", type=Path, help="write the figures as JSON")
    args = parser.parse_args(argv)
    model = str(Path(args.model).resolve())
    scans = _scans(args.scans.resolve(), args.count)
    sides = {"current": REPO, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    single: dict[str, list[float]] = {s: [] for s in sides}
    single_cpu: dict[str, list[float]] = {s: [] for s in sides}
    folder: dict[str, list[float]] = {s: [] for s in sides}
    ratios: list[float] = []
    differing, voxels = 0, 0
    with tempfile.TemporaryDirectory(prefix="infer_latency-") as tmp:
        work = Path(tmp)
        batch = work / "scans"
        batch.mkdir()
        for scan in scans:
            (batch / scan.name).symlink_to(scan.resolve())
        _run(REPO, _infer_args(model, scans[0], work / "warmup" / "mask.nii.gz", args.threads), args.threads)
        for r in range(args.repeats):
            for i, scan in enumerate(scans):
                walls = {}
                for side, src in sides.items():
                    out = work / side / f"{r}-{i}" / "mask.nii.gz"
                    wall, cpu = _run(src, _infer_args(model, scan, out, args.threads), args.threads)
                    single[side].append(wall)
                    single_cpu[side].append(cpu)
                    walls[side] = wall
                if "baseline" in sides:
                    ratios.append(walls["current"] / walls["baseline"])
                    if r == 0:
                        d, n = _differing_voxels(
                            work / "current" / f"0-{i}" / "mask.nii.gz", work / "baseline" / f"0-{i}" / "mask.nii.gz"
                        )
                        differing, voxels = differing + d, voxels + n
            for side, src in sides.items():
                wall, _ = _run(src, _infer_args(model, batch, work / side / f"folder-{r}", args.threads), args.threads)
                folder[side].append(wall / len(scans))
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "threads": args.threads,
        "scans": len(scans),
        "repeats": args.repeats,
        **{
            side: {
                "single_scan_seconds": _summary(single[side]),
                "single_scan_cpu_seconds": _summary(single_cpu[side]),
                "folder_seconds_per_scan": _summary(folder[side]),
            }
            for side in sides
        },
    }
    if "baseline" in sides:
        result["single_scan_ratio_current_over_baseline"] = _summary(ratios)
        result["masks_differing_voxels"] = {"differing": differing, "of": voxels}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
