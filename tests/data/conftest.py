"""Tiny image fixtures for the data tests, generated at test time (no binary files committed).

``make_nifti`` writes a small NIfTI volume with a chosen affine; ``patch_nifti`` rewrites raw
header bytes (after nibabel would have "repaired" them) so that corrupt headers can be produced.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

# Byte offsets of NIfTI-1 header fields (from the NIfTI-1 standard, nifti1.h).
OFFSETS = {
    "dim": (40, "<8h"),
    "datatype": (70, "<h"),
    "bitpix": (72, "<h"),
    "pixdim": (76, "<8f"),
    "qform_code": (252, "<h"),
    "sform_code": (254, "<h"),
    "srow_x": (280, "<4f"),
}


def make_nifti(
    path: Path,
    array: np.ndarray,
    affine: np.ndarray | None = None,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> Path:
    """Write ``array`` with ``affine`` (default: diag(spacing)) and qform/sform code 1."""
    if affine is None:
        affine = np.diag([*spacing, 1.0])
    img = nib.Nifti1Image(array, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def patch_nifti(path: Path, field: str, values: tuple[float, ...] | float) -> Path:
    """Overwrite one raw header field of a NIfTI file in place (gzip or not)."""
    gz = path.name.endswith(".gz")
    data = bytearray(gzip.decompress(path.read_bytes()) if gz else path.read_bytes())
    offset, fmt = OFFSETS[field]
    values = values if isinstance(values, tuple) else (values,)
    struct.pack_into(fmt, data, offset, *values)
    path.write_bytes(gzip.compress(bytes(data)) if gz else bytes(data))
    return path


@pytest.fixture
def blob() -> np.ndarray:
    """An (8, 7, 6) float32 volume with an off-centre bright block (asymmetric on purpose)."""
    rng = np.random.default_rng(0)
    array = rng.normal(10.0, 1.0, size=(8, 7, 6)).astype(np.float32)
    array[1:4, 2:5, 1:3] += 50.0
    return array


def make_nnunet(
    root: Path, n_cases: int = 2, channels: int = 2, spacing: tuple[float, float, float] = (1.0, 1.0, 2.0)
) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(1)
    for i in range(n_cases):
        for c in range(channels):
            make_nifti(
                root / "imagesTr" / f"case{i}_{c:04d}.nii.gz",
                rng.normal(size=(6, 5, 4)).astype(np.float32),
                spacing=spacing,
            )
        label = np.zeros((6, 5, 4), np.uint8)
        label[1:3, 1:3, 1:3] = 2
        label[4, 4, 3] = 1
        make_nifti(root / "labelsTr" / f"case{i}.nii.gz", label, spacing=spacing)
    desc = {
        "channel_names": {str(c): ["CT", "T2"][c % 2] for c in range(channels)},
        "labels": {"background": 0, "a": 1, "b": 2},
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
        "name": "tiny",
    }
    (root / "dataset.json").write_text(json.dumps(desc))
    return root


def mini_msd(src: Path, dst: Path, n: int) -> Path:
    """A symlinked subset of an MSD dataset (keeps the real-data tests fast)."""
    desc = json.loads((src / "dataset.json").read_text())
    desc["training"], desc["numTraining"] = desc["training"][:n], n
    for sub in ("imagesTr", "labelsTr"):
        (dst / sub).mkdir(parents=True)
    for entry in desc["training"]:
        for key in ("image", "label"):
            os.symlink(src / entry[key], dst / entry[key])
    (dst / "dataset.json").write_text(json.dumps(desc))
    return dst
