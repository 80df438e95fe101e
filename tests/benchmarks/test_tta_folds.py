"""benchmarks/tta_folds.py: mirroring variants on vs_monai work folders, paired against no mirroring."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from _work_folder import REPO, work_folder
from _work_folder import load as _load


def test_summary_pools_cases_and_pairs_them() -> None:
    tta = _load("tta_folds", REPO / "benchmarks" / "tta_folds.py")
    assert tta.variant_args("none") == ["--no-tta"] and tta.variant_args("0,1") == ["--tta", "--mirror-axes", "0,1"]
    per = {
        "none": {"f0/a": (0.80, 4.0), "f0/b": (0.90, 2.0), "f1/c": (0.70, math.inf)},
        "0,1": {"f0/a": (0.84, 3.0), "f0/b": (0.89, 2.0), "f1/c": (0.76, 6.0)},
    }
    rows = tta.summarise(per, {"none": [1.0, 3.0, 2.0], "0,1": [2.0]})
    assert rows["none"]["dice_mean"] == 0.8 and rows["none"]["hd95_mean"] == 3.0  # inf left out
    assert rows["none"]["seconds_per_scan"] == 2.0 and "gain_mean" not in rows["none"]
    assert rows["0,1"]["gain_mean"] == pytest.approx(0.03) and rows["0,1"]["dice_min"] == 0.76
    assert (rows["0,1"]["cases_improved"], rows["0,1"]["cases_worse"]) == (2, 1)
    monai = tta.against_monai(per, {"f0/a": (0.82, 1.0), "f0/b": (0.80, 1.0)})  # fold f1 without MONAI
    assert monai["cases"] == 2 and monai["folds"] == ["f0"] and monai["dice_mean"] == 0.81
    assert monai["medgn_dice_mean"] == {"none": 0.85, "0,1": 0.865} and monai["medgn_ahead"] == {"none": 1, "0,1": 2}
    text = tta.markdown({"machine": "m", "threads": 1, "folds": ["f0", "f1"], "variants": rows, "monai": monai})
    assert "| 0,1 | `--tta --mirror-axes 0,1` | 0.8300 |" in text and "| 0,1 | 0.8650 | +0.0550 | 2 of 2 |" in text


def test_runs_the_command_line_on_a_work_folder(tmp_path: Path) -> None:
    fold = work_folder(tmp_path / "fold")
    out = tmp_path / "tta.json"
    tta = _load("tta_folds", REPO / "benchmarks" / "tta_folds.py")
    assert tta.main(["--folds", str(fold), "--variants", "2", "--threads", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert list(doc["variants"]) == ["none", "2"] and doc["folds"] == ["fold"] and "monai" not in doc
    assert doc["variants"]["2"]["cases"] == 1 and "gain_mean" in doc["variants"]["2"]
    sidecars = [json.loads((fold / "tta" / v / "pred" / "a.json").read_text())["settings"] for v in ("none", "2")]
    assert [(s["tta"], s["mirror_axes"]) for s in sidecars] == [(False, [0, 1, 2]), (True, [2])]
    assert (out.with_suffix(".md")).read_text().count("\n| ") == 3  # header + 2 variants
