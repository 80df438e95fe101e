"""Property-based ``medgn infer`` end to end: any small volume gives a valid mask or a clean refusal.

Hypothesis draws the shape (1..14 per axis), spacing (0.05..60 mm per axis), direction (any of the
48 axis flips/permutations or an oblique rotation), origin, voxel type, intensity pattern (zeros,
constant, one voxel, noise over a drawn range), file format (NIfTI, NIfTI-gz, NRRD, MetaImage) and
channel count (the tiny model takes one); the CLI runs in this process with a resampled-size limit
that keeps each example small. The outcome is always exit 0 with a mask of exactly the input's
shape and geometry, or exit 3/5 with one error line naming the file -- never an internal error.

CI runs 25 examples; ``MEDGN_FUZZ_EXAMPLES=2000`` runs a campaign (see
``benchmarks/results/fuzz_infer.md``).
"""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medgn.data.io import geometry_diff, read_header, read_volume
from tests.reliability.conftest import cli, write_itk

EXAMPLES = int(os.environ.get("MEDGN_FUZZ_EXAMPLES", "25"))
# Resampled voxels allowed per example: the model's 8^3 patch over 300k voxels takes ~1 s on one
# core; larger grids are refused with code 5, which is one of the outcomes under test.
MAX_RESAMPLED = 300_000
DTYPES = ["uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64"]
SUFFIXES = [".nii.gz", ".nii", ".nrrd", ".mha"]
AXIS_MAPS = [
    (perm, signs) for perm in itertools.permutations(range(3)) for signs in itertools.product((1, -1), repeat=3)
]


@st.composite
def volumes(draw: st.DrawFn) -> dict[str, Any]:
    shape = tuple(draw(st.integers(1, 14)) for _ in range(3))
    spacing = [draw(st.one_of(st.sampled_from([0.05, 0.1, 1.0, 10.0, 60.0]), st.floats(0.05, 60.0))) for _ in range(3)]
    if draw(st.booleans()):
        perm, signs = draw(st.sampled_from(AXIS_MAPS))
        rotation = np.zeros((3, 3))
        for col, (row, sign) in enumerate(zip(perm, signs)):
            rotation[row, col] = sign
    else:  # oblique: a rotation from three drawn angles
        a, b, c = (draw(st.floats(-np.pi, np.pi)) for _ in range(3))
        rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
        rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
        rotation = rz @ ry @ rx
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = [draw(st.floats(-500, 500)) for _ in range(3)]
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    pattern = draw(st.sampled_from(["zeros", "constant", "one_voxel", "noise"]))
    low = draw(st.sampled_from([-1e6, -3000.0, -1.0, 0.0, 1.0, 1000.0]))
    high = low + draw(st.sampled_from([0.0, 1e-3, 1.0, 255.0, 4000.0, 1e6]))
    return {
        "shape": shape,
        "affine": affine,
        "dtype": dtype,
        "pattern": pattern,
        "low": low,
        "high": high,
        "suffix": draw(st.sampled_from(SUFFIXES)),
        "channels": draw(st.sampled_from([1, 1, 1, 2])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _array(spec: dict[str, Any]) -> np.ndarray:
    dtype, shape = spec["dtype"], spec["shape"]
    low, high = spec["low"], spec["high"]
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        low, high = float(np.clip(low, info.min, info.max)), float(np.clip(high, info.min, info.max))
    rng = np.random.default_rng(spec["seed"])
    if spec["pattern"] == "zeros":
        values = np.zeros(shape)
    elif spec["pattern"] == "constant":
        values = np.full(shape, high)
    elif spec["pattern"] == "one_voxel":
        values = np.zeros(shape)
        values[tuple(rng.integers(0, s) for s in shape)] = high if high != 0 else 1.0
    else:
        values = rng.uniform(low, high, size=shape)
    if dtype.kind in "iu":
        values = np.clip(np.round(values), info.min, info.max)
        return (
            values.astype(np.float64).astype(dtype)
            if dtype.itemsize < 8
            else np.asarray([int(v) for v in values.ravel()], dtype=dtype).reshape(shape)
        )
    return values.astype(dtype)


def _write(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    if path.name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        img = nib.Nifti1Image(array, affine, dtype=array.dtype)
        img.header.set_qform(affine, code=1)
        img.header.set_sform(affine, code=1)
        nib.save(img, str(path))
        return path
    return write_itk(path, array, affine)


def _check_example(spec: dict[str, Any], model: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with tempfile.TemporaryDirectory(prefix="medgn-fuzz-") as tmp:
        root = Path(tmp)
        inputs = root / "in"
        inputs.mkdir()
        array = _array(spec)
        names = [f"case_{c:04d}{spec['suffix']}" for c in range(spec["channels"])]
        paths = [_write(inputs / n, array, spec["affine"]) for n in names]
        target = paths[0] if spec["channels"] == 1 else inputs
        out = root / "out"
        result = cli(
            [
                "infer",
                "--model",
                model,
                "--input",
                target,
                "--output",
                out,
                "--no-progress",
                "--max-resampled-voxels",
                str(MAX_RESAMPLED),
            ],
            capsys,
        )
        assert "Traceback" not in result.err and "internal error" not in result.err, result.err
        if result.code == 0:
            mask_name = "case" if spec["channels"] > 1 else paths[0].name.split(".")[0]
            mask_path = out / f"{mask_name}{spec['suffix']}"
            assert geometry_diff(read_header(paths[0]), read_header(mask_path)) == []
            mask = read_volume(mask_path, label=True).array
            assert mask.shape == tuple(spec["shape"]) and set(np.unique(mask).tolist()) <= {0, 1}
            return 0, ""
        lines = [line for line in result.err.splitlines() if line.startswith("medgn: error: ")]
        assert result.code in (3, 5) and len(lines) == 1, result.err
        assert str(paths[0]) in lines[0] or str(inputs) in lines[0], lines[0]
        return result.code, lines[0].split(": ", 3)[-1].split(" (")[0]


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(spec=volumes())
def test_infer_gives_a_valid_mask_or_a_clean_refusal(
    spec: dict[str, Any], model_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, what = _check_example(spec, model_run, capsys)
    if os.environ.get("MEDGN_FUZZ_REPORT"):  # one line per example: the campaign's tally
        key = f"{code} {what.split(': ', 1)[-1]}" if code else "0 mask written"
        with open(os.environ["MEDGN_FUZZ_REPORT"], "a", encoding="utf-8") as handle:
            handle.write(f"{key}\n")
