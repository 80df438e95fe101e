"""benchmarks/infer_latency.py: whole ``medgn infer`` processes per scan and per folder, against a baseline tree."""

from __future__ import annotations

import json
from pathlib import Path

from _work_folder import REPO, work_folder
from _work_folder import load as _load


def test_times_single_scans_and_folders_against_a_baseline_tree(tmp_path: Path) -> None:
    fold = work_folder(tmp_path / "fold")
    bench = _load("infer_latency", REPO / "benchmarks" / "infer_latency.py")
    out = tmp_path / "latency.json"
    args = ["--model", str(fold / "medgn" / "medgn_run"), "--scans", str(fold / "val_images")]
    assert (
        bench.main(
            [*args, "--count", "1", "--repeats", "1", "--threads", "1", "--baseline", str(REPO), "--out", str(out)]
        )
        == 0
    )
    doc = json.loads(out.read_text())
    assert doc["scans"] == 1 and doc["threads"] == 1
    for side in ("current", "baseline"):
        single = doc[side]["single_scan_seconds"]
        assert 0 < single["min"] <= single["median"] <= single["max"]
        assert doc[side]["folder_seconds_per_scan"]["median"] > 0
    # the same tree on both sides: the same masks, voxel for voxel
    assert doc["masks_differing_voxels"] == {"differing": 0, "of": 12**3}
    assert doc["single_scan_ratio_current_over_baseline"]["median"] > 0
