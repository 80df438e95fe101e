"""Blank and degenerate volumes through the whole ``medgn infer`` pipeline: a mask or a clean refusal.

All-zero, constant, a single foreground voxel, 1xNxN and NxNx1, smaller than the 8^3 patch and
than the network's stride, 0.1 x 0.1 x 10 mm voxels, very large voxels, negative and integer
intensities and every voxel type the readers accept (NIfTI, NRRD and MetaImage). One folder run:
each case gives a mask with exactly its input's geometry (an empty one, with a warning in the
sidecar, when the image is blank) or a one-line code-5 error naming it; never an internal error.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medgn.data.io import geometry_diff, read_header, read_volume
from tests.reliability.conftest import AFFINE, write_itk, write_nifti


def _affine(spacing: tuple[float, float, float]) -> np.ndarray:
    affine = AFFINE.copy()
    affine[:3, :3] = np.diag(spacing)
    return affine


def _noise(shape: tuple[int, ...], dtype: str = "float32", low: float = 0.0, high: float = 100.0) -> np.ndarray:
    return np.random.default_rng(len(shape) + sum(shape)).uniform(low, high, size=shape).astype(dtype)


def _one_voxel() -> np.ndarray:
    array = np.zeros((10, 9, 8), np.float32)
    array[3, 4, 5] = 1.0
    return array


# name -> (array, affine, writer suffix); every case must give a mask
OK_CASES: dict[str, tuple[np.ndarray, np.ndarray, str]] = {
    "zeros": (np.zeros((10, 9, 8), np.float32), AFFINE, ".nii.gz"),
    "zeros_int": (np.zeros((6, 5, 4), np.int16), AFFINE, ".nrrd"),
    "constant": (np.full((10, 9, 8), 7.0, np.float32), AFFINE, ".nii.gz"),
    "constant_negative": (np.full((4, 4, 4), -1024, np.int16), AFFINE, ".mha"),
    "one_voxel": (_one_voxel(), AFFINE, ".nii.gz"),
    "x1": (_noise((1, 9, 8)), AFFINE, ".nii.gz"),
    "z1": (_noise((10, 9, 1)), AFFINE, ".nrrd"),
    "tiny": (_noise((2, 2, 2)), AFFINE, ".nii.gz"),
    "one_by_one": (_noise((1, 1, 1)), AFFINE, ".mha"),
    "below_stride": (_noise((1, 3, 1)), AFFINE, ".nii.gz"),
    "anisotropic": (_noise((30, 30, 3)), _affine((0.1, 0.1, 10.0)), ".nii.gz"),
    "large_spacing": (_noise((4, 4, 4)), _affine((20.0, 20.0, 20.0)), ".nii.gz"),
    "negative": (_noise((10, 9, 8), "float32", -3000.0, -1000.0), AFFINE, ".nii.gz"),
    **{
        f"type_{t}": (_noise((6, 5, 4), t, 0, 120), AFFINE, ".nii.gz")
        for t in ("uint8", "int8", "int16", "uint16", "int32", "uint32", "float32", "float64")
    },
    "type_int16_range": (np.linspace(-32768, 32767, 120).reshape(6, 5, 4).astype(np.int16), AFFINE, ".nii.gz"),
    "type_int64_nrrd": (_noise((6, 5, 4), "int64", -5, 5), AFFINE, ".nrrd"),
    "type_uint64_mha": (_noise((6, 5, 4), "uint64", 0, 9), AFFINE, ".mha"),
    "type_float64_mha": (_noise((6, 5, 4), "float64", -1e6, 1e6), AFFINE, ".mha"),
}
# name -> (array, affine): refused with code 5 (too large once resampled), never resampled
REFUSED: dict[str, tuple[np.ndarray, np.ndarray]] = {
    "huge_spacing": (_noise((20, 20, 20)), _affine((50.0, 50.0, 50.0))),
}


def _write(folder: Path, name: str, array: np.ndarray, affine: np.ndarray, suffix: str) -> Path:
    path = folder / f"{name}{suffix}"
    if suffix.startswith(".nii"):
        import nibabel as nib

        img = nib.Nifti1Image(array, affine, dtype=array.dtype)  # explicit dtype: int64 and friends too
        img.header.set_qform(affine, code=1)
        img.header.set_sform(affine, code=1)
        nib.save(img, str(path))
        return path
    return write_itk(path, array, affine)


@pytest.fixture(scope="module")
def degenerate_run(model_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, int]]:
    root = tmp_path_factory.mktemp("degenerate")
    inputs = root / "in"
    inputs.mkdir()
    for name, (array, affine, suffix) in OK_CASES.items():
        _write(inputs, name, array, affine, suffix)
    for name, (array, affine) in REFUSED.items():
        write_nifti(inputs / f"{name}.nii.gz", array, affine)
    from medgn.cli import main
    from medgn.logs import detach_file_logs

    code = main(
        [
            "infer",
            "--model",
            str(model_run),
            "--input",
            str(inputs),
            "--output",
            str(root / "out"),
            "--no-progress",
            "--save-probabilities",
        ]
    )
    detach_file_logs()
    report = json.loads((root / "out" / "report.json").read_text())
    return inputs, root / "out", {"exit": code, **{c["case_id"]: c["code"] or 0 for c in report["cases"]}}


@pytest.mark.parametrize("name", sorted(OK_CASES))
def test_degenerate_volume_gives_a_mask_with_the_input_geometry(
    degenerate_run: tuple[Path, Path, dict[str, int]], name: str
) -> None:
    inputs, out, codes = degenerate_run
    suffix = OK_CASES[name][2]
    assert codes[name] == 0, json.loads((out / "report.json").read_text())
    source, mask_path = inputs / f"{name}{suffix}", out / f"{name}{suffix}"
    assert geometry_diff(read_header(source), read_header(mask_path)) == []
    mask = read_volume(mask_path, label=True).array
    assert mask.shape == OK_CASES[name][0].shape and set(np.unique(mask).tolist()) <= {0, 1}
    probs = np.load(out / f"{name}_probabilities.npz")["probabilities"].astype(np.float32)
    assert np.isfinite(probs).all() and np.allclose(probs.sum(axis=0), 1.0, atol=2e-3)
    sidecar = json.loads((out / f"{name}.json").read_text())
    assert sidecar["status"] == "done"
    if name.startswith("zeros"):  # blank: nothing to segment, an empty mask, said in the sidecar
        assert not mask.any()
        assert any("blank" in w for w in sidecar["warnings"]), sidecar["warnings"]
    elif not mask.any():
        assert any("mask is empty" in w for w in sidecar["warnings"]), sidecar["warnings"]


def test_refused_degenerate_volumes_and_the_exit_code(degenerate_run: tuple[Path, Path, dict[str, int]]) -> None:
    _, out, codes = degenerate_run
    for name in REFUSED:
        assert codes[name] == 5 and not (out / f"{name}.nii.gz").exists()
    assert codes["exit"] == 5  # the highest failure category of the run; no case is an internal error
    assert 1 not in codes.values()
