"""The geometry invariant through the whole inference path, in NIfTI, NRRD and MHA.

Fifty 12^3 volumes per format (all 48 axis permutations/flips of an anisotropic affine plus two
oblique affines) each go through ``infer`` (read, MONAI orientation to RAS and spacing, sliding
windows, inversion, geometry-checked write) with an intensity-threshold network, so the predicted
mask is the input blob exactly when no axis was lost, flipped or resampled on the way.
"""

from __future__ import annotations

from pathlib import Path

import _infer_fixtures as F
import numpy as np
import pytest

from medgn.infer.predictor import Predictor
from medgn.infer.run import infer

SUFFIXES = {"nifti": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha"}
AFFINES = [(f"axis{i:02d}", a) for i, a in enumerate(F.axis_affines())] + [
    (f"oblique{i}", a) for i, a in enumerate(F.oblique_affines())
]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("fmt", list(SUFFIXES))
def test_every_orientation_keeps_geometry_and_blob(tmp_path: Path, fmt: str) -> None:
    from medgn.data.io import geometry_diff, read_volume

    src = tmp_path / "in"
    src.mkdir()
    for name, affine in AFFINES:
        F.write_image(src / f"{name}{SUFFIXES[fmt]}", F.image(), affine)
    # The spacing in RAS axis order differs per orientation, so each orientation is its own
    # single-case run with a plan whose target spacing is the volume's own (no resampling).
    net = F.ThresholdNet()
    failures = []
    for name, affine in AFFINES:
        case_dir = tmp_path / "cases" / name
        case_dir.mkdir(parents=True)
        (case_dir / f"{name}{SUFFIXES[fmt]}").symlink_to(src / f"{name}{SUFFIXES[fmt]}")
        predictor = Predictor.from_modules([net], F.plan(target_spacing=F.ras_spacing(affine)))
        report = infer(predictor, case_dir, tmp_path / "out" / name)
        assert report.exit_code == 0, report.to_dict()
        ref = read_volume(src / f"{name}{SUFFIXES[fmt]}")
        mask = read_volume(tmp_path / "out" / name / f"{name}{SUFFIXES[fmt]}", label=True)
        diffs = geometry_diff(ref, mask)
        if fmt == "nifti":
            codes = (mask.meta["qform_code"], mask.meta["sform_code"])
            if codes != (ref.meta["qform_code"], ref.meta["sform_code"]):
                diffs.append(f"codes {codes}")
        if mask.shape != ref.shape or np.max(np.abs(mask.affine - ref.affine)) > 1e-5:
            diffs.append("affine")
        dice = _dice(mask.array == 1, F.blob())
        if diffs or dice != 1.0:
            failures.append(f"{name}: {diffs} dice={dice:.3f}")
    assert not failures, failures
