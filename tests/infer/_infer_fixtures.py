"""Tiny volumes, an intensity-threshold network and real checkpoints for the inference tests.

Not collected by pytest (leading underscore); the inference tests and the kill -9 driver import it.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# 12 voxels per axis: big enough for a blob that is asymmetric along every axis and two 8-voxel
# windows per axis at overlap 0.5, small enough that 150 volumes run in seconds.
SIZE = 12
# Anisotropic spacing so a swapped axis changes the geometry, not only the orientation.
SPACING = (0.8, 1.0, 1.25)
PATCH = [8, 8, 8]


class ThresholdNet(nn.Module):
    """Logits (B, 2, ...) = (-(x - t), x - t) * s: class 1 exactly where the image is above t."""

    def __init__(self, threshold: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        # A large scale keeps the softmax far from 0.5 everywhere, so blending never flips a voxel.
        self.register_buffer("scale", torch.tensor(50.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = (x[:, :1] - self.threshold) * self.scale
        return torch.cat([-d, d], dim=1)


def blob() -> np.ndarray:
    """A (12, 12, 12) bool blob occupying the low-x ("left-only") part, asymmetric on every axis."""
    mask = np.zeros((SIZE,) * 3, dtype=bool)
    mask[1:5, 2:9, 3:7] = True
    mask[1:3, 2:4, 7:10] = True  # a spur that makes each axis flip distinguishable
    return mask


def image(seed: int = 0) -> np.ndarray:
    """Blob at 100 over a background in [1, 2): z-score puts the blob far above 0 and the rest below."""
    rng = np.random.default_rng(seed)
    return np.where(blob(), 100.0, 1.0 + rng.random((SIZE,) * 3)).astype(np.float32)


def axis_affines() -> list[np.ndarray]:
    """All 48 voxel->RAS affines made of an axis permutation and sign flips, with SPACING."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            rot = np.zeros((3, 3))
            for voxel_axis, world_axis in enumerate(perm):
                rot[world_axis, voxel_axis] = signs[voxel_axis] * SPACING[voxel_axis]
            aff = np.eye(4)
            aff[:3, :3] = rot
            aff[:3, 3] = (-7.5, 12.25, 3.0)  # an arbitrary non-zero origin
            out.append(aff)
    return out


def oblique_affines() -> list[np.ndarray]:
    """Two rotated affines (about 20 and 35 degrees around tilted axes) with SPACING."""
    out = []
    for angle, axis in ((20.0, (0.0, 0.0, 1.0)), (35.0, (1.0, 1.0, 0.3))):
        a = np.asarray(axis) / np.linalg.norm(axis)
        t = np.deg2rad(angle)
        k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
        rot = np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k  # Rodrigues' formula
        aff = np.eye(4)
        aff[:3, :3] = rot @ np.diag(SPACING)
        aff[:3, 3] = (10.0, -20.0, 5.5)
        out.append(aff)
    return out


def write_image(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write ``array`` (X, Y, Z) with a RAS ``affine`` as NIfTI (codes 1/1), NRRD or MHA."""
    if path.name.endswith((".nii.gz", ".nii")):
        import nibabel as nib

        img = nib.Nifti1Image(array, affine)
        img.header.set_qform(affine, code=1)
        img.header.set_sform(affine, code=1)
        nib.save(img, str(path))
    else:
        import SimpleITK as sitk

        from medgn.data.preflight import itk_geometry

        origin, spacing, direction = itk_geometry(affine)
        itk = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
        itk.SetOrigin(origin)
        itk.SetSpacing(spacing)
        itk.SetDirection(direction)
        sitk.WriteImage(itk, str(path), True)
    return path


def ras_spacing(affine: np.ndarray) -> list[float]:
    """Voxel sizes in the order of the RAS-oriented array (what a plan's target_spacing means)."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    out = [0.0, 0.0, 0.0]
    for voxel_axis, (world_axis, _) in enumerate(ornt):
        out[int(world_axis)] = float(spacing[voxel_axis])
    return out


def plan(target_spacing: list[float] | None = None, in_channels: int = 1) -> dict[str, Any]:
    """A two-class plan whose preprocessing keeps the input grid (target spacing = own spacing)."""
    return {
        "version": 1,
        "in_channels": in_channels,
        "num_classes": 2,
        "label_values": [0, 1],
        "target_spacing": list(target_spacing or ras_spacing(axis_affines()[0])),
        "normalization": [{"scheme": "zscore"}] * in_channels,
        "patch_size": list(PATCH),
        "batch_size": 1,
        "network": {"strides": [[1, 1, 1], [2, 2, 2]], "kernel_sizes": [[3, 3, 3], [3, 3, 3]]},
    }


def tiny_model_config() -> dict[str, Any]:
    """The smallest UNet3D config: two stages of 4 and 8 channels."""
    return {"model": {"features": [4, 8], "num_groups": 2, "deep_supervision": False}}


def save_run(
    run_dir: Path,
    seed: int = 0,
    in_channels: int = 1,
    plan_dict: dict[str, Any] | None = None,
    infer: Any = None,
) -> Path:
    """A run folder with one real (untrained) UNet3D checkpoint marked best; returns run_dir.

    ``infer``: the config's ``infer`` section (inference defaults); None leaves it out, as in
    checkpoints from before it existed.
    """
    from medgn.checkpoint import save_checkpoint
    from medgn.configtools import build
    from medgn.models.config import UNet3DConfig
    from medgn.models.registry import build_model

    p = plan_dict or plan(in_channels=in_channels)
    config = tiny_model_config()
    if infer is not None:
        config["infer"] = infer
    torch.manual_seed(seed)
    net = build_model(
        build(UNet3DConfig, config["model"], "model"),
        p["in_channels"],
        p["num_classes"],
        p["network"]["strides"],
        p["network"]["kernel_sizes"],
    )
    state = {
        "model": {k: v.clone() for k, v in net.state_dict().items()},
        "config": config,
        "plan": p,
        "counters": {"epoch": 1, "iteration": 1},
    }
    save_checkpoint(state, run_dir / "checkpoints", tag="epoch", pointers=("latest", "best"))
    return run_dir
