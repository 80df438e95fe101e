"""Geometry round trip through ``medgn infer``: every written mask has exactly its input's geometry.

An asymmetric volume in all 48 axis permutations/flips (with anisotropic spacing and an offset
origin) and two oblique orientations, as NIfTI, NRRD and MetaImage, goes through one CLI run; each
mask must have the input's shape, spacing, origin and direction (and NIfTI qform/sform codes), read
back from the raw header. The Dice = 1 check of the blob with an identity model lives in
tests/infer/test_infer_geometry.py; this test covers the CLI path with a real checkpoint.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medgn.data.io import geometry_diff, read_header
from tests.reliability.conftest import SPACING, cli, image_array, tree_hashes, write_image


def _affines() -> list[np.ndarray]:
    """48 permutation/flip affines with anisotropic spacing, then two oblique ones."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            aff = np.eye(4)
            aff[:3, :3] = 0.0
            for voxel_axis, world_axis in enumerate(perm):
                aff[world_axis, voxel_axis] = signs[voxel_axis] * SPACING[voxel_axis]
            aff[:3, 3] = (-7.5, 12.25, 3.0)
            out.append(aff)
    for angle, axis in ((20.0, (0.0, 0.0, 1.0)), (35.0, (1.0, 1.0, 0.3))):
        a = np.asarray(axis) / np.linalg.norm(axis)
        k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
        t = np.deg2rad(angle)
        rot = np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k  # Rodrigues' formula
        aff = np.eye(4)
        aff[:3, :3] = rot @ np.diag(SPACING)
        aff[:3, 3] = (10.0, -20.0, 5.5)
        out.append(aff)
    return out


def test_masks_keep_the_geometry_of_every_orientation_and_format(
    tmp_path: Path, model_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    names = []
    for i, affine in enumerate(_affines()):
        # Every orientation as NIfTI; every third one (and both oblique) also as NRRD and MHA.
        suffixes = [".nii.gz"] + ([".nrrd", ".mha"] if i % 3 == 0 or i >= 48 else [])
        for suffix in suffixes:
            name = f"o{i:02d}{suffix.replace('.', '_')}{suffix}"
            write_image(inputs / name, image_array(seed=i), affine)
            names.append(name)
    before = tree_hashes(inputs)
    out = tmp_path / "out"
    result = cli(["infer", "--model", model_run, "--input", inputs, "--output", out, "--no-progress"], capsys)
    assert result.code == 0, result.err
    assert tree_hashes(inputs) == before
    for name in names:
        src, mask = read_header(inputs / name), read_header(out / name)
        assert geometry_diff(src, mask) == [], name
        assert mask.dtype == np.uint8, name
        if name.endswith(".nii.gz"):
            a, b = nib.load(inputs / name).header, nib.load(out / name).header
            assert (int(a["qform_code"]), int(a["sform_code"])) == (int(b["qform_code"]), int(b["sform_code"])), name
            np.testing.assert_array_equal(a.get_sform(), b.get_sform())
            np.testing.assert_array_equal(a.get_qform(), b.get_qform())
