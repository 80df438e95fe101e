"""benchmarks/invert_folds.py: the same probabilities inverted as probabilities and as log-probabilities."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _work_folder import REPO, work_folder
from _work_folder import load as _load


def test_scores_both_inversions_on_a_work_folder(tmp_path: Path) -> None:
    from medgn.data.io import read_volume

    fold = work_folder(tmp_path / "fold")
    label = read_volume(fold / "val_labels" / "a.nii.gz", label=True).array
    bench = _load("invert_folds", REPO / "benchmarks" / "invert_folds.py")
    out = tmp_path / "invert.json"
    assert bench.main(["--folds", str(fold), "--threads", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["cases"] == 1 and doc["folds"] == ["fold"]
    scores = {way: doc["per_case"][way]["fold/a.nii.gz"] for way in ("probabilities", "log_probabilities")}
    assert doc["ways"]["log_probabilities"]["dice_min"] == round(scores["log_probabilities"], 4)
    assert doc["log_minus_prob"]["mean"] == round(scores["log_probabilities"] - scores["probabilities"], 4)
    # The benchmark's log-probabilities are what `medgn infer` writes with the model's defaults.
    from medgn.infer.run import infer

    assert infer(str(fold / "medgn" / "medgn_run"), fold / "val_images", tmp_path / "pred").exit_code == 0
    mask = read_volume(tmp_path / "pred" / "a.nii.gz", label=True).array > 0
    assert scores["log_probabilities"] == pytest.approx(bench.dice(mask, label > 0), abs=1e-12)
    assert "| log-probabilities |" in out.with_suffix(".md").read_text()
