"""benchmarks/invert_folds.py: the same probabilities inverted as probabilities and as log-probabilities."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scores_both_inversions_on_a_work_folder(tmp_path: Path) -> None:
    pytest.importorskip("medgn.data.pipeline")
    F = _load("_infer_fixtures", REPO / "tests" / "infer" / "_infer_fixtures.py")
    fold = tmp_path / "fold"
    F.save_run(fold / "medgn" / "medgn_run")
    for name in ("val_images", "val_labels"):
        (fold / name).mkdir()
    affine = F.axis_affines()[0]
    F.write_image(fold / "val_images" / "a.nii.gz", F.image(), affine)
    label = F.blob().astype(np.uint8)
    F.write_image(fold / "val_labels" / "a.nii.gz", label, affine)
    bench = _load("invert_folds", REPO / "benchmarks" / "invert_folds.py")
    out = tmp_path / "invert.json"
    assert bench.main(["--folds", str(fold), "--threads", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["cases"] == 1 and doc["folds"] == ["fold"]
    scores = {way: doc["per_case"][way]["fold/a.nii.gz"] for way in ("probabilities", "log_probabilities")}
    assert doc["ways"]["log_probabilities"]["dice_min"] == round(scores["log_probabilities"], 4)
    assert doc["log_minus_prob"]["mean"] == round(scores["log_probabilities"] - scores["probabilities"], 4)
    # The benchmark's log-probabilities are what `medgn infer` writes with the model's defaults.
    from medgn.data.io import read_volume
    from medgn.infer.run import infer

    assert infer(str(fold / "medgn" / "medgn_run"), fold / "val_images", tmp_path / "pred").exit_code == 0
    mask = read_volume(tmp_path / "pred" / "a.nii.gz", label=True).array > 0
    assert scores["log_probabilities"] == pytest.approx(bench.dice(mask, label > 0), abs=1e-12)
    assert "| log-probabilities |" in out.with_suffix(".md").read_text()
