"""Image headers, format-neutral: the limits, the validated header record and the checks every format shares.

This module owns :class:`Limits`, :class:`HeaderInfo`, the file suffixes medgn reads and writes,
:func:`detect_format`, the checks of shape, data type, size and affine that every format's header
goes through (each failure an :class:`~medgn.errors.InputDataError`, exit 3, or for limits a
:class:`~medgn.errors.ResourceError`, exit 5, naming the file) and the conversion between ITK's
LPS geometry and medgn's RAS affine. The formats' own header readers (:mod:`medgn.data.nifti_header`,
:mod:`medgn.data.itk_header`, :mod:`medgn.data.dicom_header`) build on it; :mod:`medgn.data.preflight`
picks one per file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medgn.errors import InputDataError, ResourceError

# LPS (ITK, DICOM) <-> RAS (NIfTI, medgn) world axes: flip x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = {".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "mha", ".mhd": "mha"}
SUPPORTED = ".nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd or a DICOM series folder"
# Single-file formats medgn writes masks in (and evaluates): the one list of label-map suffixes.
MASK_SUFFIXES = (*NIFTI_SUFFIXES, ".nrrd", ".mha")


@dataclass(frozen=True)
class Limits:
    """Size limits enforced from the header alone, before any allocation.

    Attributes:
        max_voxels: most voxels per channel; 512**3 (134 M) covers a full-body CT at 1 mm and keeps
            one float32 copy at 512 MiB, which the 2-4 working copies of a pipeline can afford.
        max_bytes: most bytes of the stored pixel array; 2 GiB so that a float64 volume at the voxel
            limit (1 GiB) passes while a corrupt header cannot make us allocate tens of GiB.
        max_dim: most voxels along one axis; no scanner produces more than a few thousand, so a
            larger value means a corrupt or hostile header.
        max_resampled_voxels: most voxels of the image once resampled to the plan's spacing (see
            :mod:`medgn.data.workload`); 512**3 like ``max_voxels``: the pipeline holds a few
            float32 copies of the resampled image, so the same budget applies after resampling.
        max_windows: most sliding windows over one resampled image at inference; 50,000 windows
            of a full-size network take the better part of an hour even on a GPU, so more means a
            header or plan mistake rather than a real scan.
    """

    max_voxels: int = field(default=512**3, metadata={"min": 1})
    max_bytes: int = field(default=2 * 1024**3, metadata={"min": 1})
    max_dim: int = field(default=8192, metadata={"min": 1})
    max_resampled_voxels: int = field(default=512**3, metadata={"min": 1})
    max_windows: int = field(default=50_000, metadata={"min": 1})


DEFAULT_LIMITS = Limits()


@dataclass
class HeaderInfo:
    """What the header of an image says, validated.

    Attributes:
        path: the file (or DICOM folder).
        format: "nifti", "nrrd", "mha" or "dicom".
        shape: (X, Y, Z) in file voxel order.
        dtype: the stored pixel type.
        spacing: voxel size in mm along X, Y, Z.
        affine: 4x4 float64 voxel -> world (RAS, mm).
        meta: format details a writer needs (NIfTI header and codes, or ITK origin/spacing/direction).
    """

    path: Path
    format: str
    shape: tuple[int, int, int]
    dtype: np.dtype
    spacing: tuple[float, float, float]
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


def detect_format(path: Path) -> str:
    """The format of ``path`` from its name ("nifti", "nrrd", "mha") or "dicom" for a folder."""
    if path.is_dir():
        return "dicom"
    lower = path.name.lower()
    if lower.endswith(NIFTI_SUFFIXES):
        return "nifti"
    for suffix, fmt in ITK_SUFFIXES.items():
        if lower.endswith(suffix):
            return fmt
    raise InputDataError(path, "unsupported file type", got=path.suffix or "no suffix", expected=SUPPORTED)


def check_size(path: Path, shape: tuple[int, ...], itemsize: int, limits: Limits) -> None:
    """Refuse a header whose axes, voxel count or bytes exceed ``limits`` (ResourceError, exit 5)."""
    if any(d > limits.max_dim for d in shape):
        raise ResourceError(
            path,
            "image dimension above the limit",
            got=f"shape {shape}",
            expected=f"each axis <= {limits.max_dim} (raise it with --max-dim; for train, data.limits.max_dim)",
        )
    voxels = int(np.prod(np.asarray(shape, dtype=np.int64)))
    if voxels > limits.max_voxels:
        raise ResourceError(
            path,
            "image has too many voxels",
            got=f"shape {shape} = {voxels} voxels",
            expected=f"<= {limits.max_voxels} (raise it with --max-voxels; for train, data.limits.max_voxels)",
        )
    if voxels * itemsize > limits.max_bytes:
        raise ResourceError(
            path, "image is too large", got=f"{voxels * itemsize} bytes", expected=f"<= {limits.max_bytes} bytes"
        )


def check_channel_axis(path: Path, shape: tuple[int, ...], channels: int) -> tuple[int, int, int]:
    """The 3D grid of a header shape whose 4th axis must hold exactly ``channels`` channels.

    Raises:
        InputDataError: the file is 3D, has another channel count, or more than 4 axes (exit 3).
    """
    found = int(shape[3]) if len(shape) >= 4 else 1
    if len(shape) < 3 or any(d != 1 for d in shape[4:]):
        raise InputDataError(
            path,
            f"expected a 4D image with {channels} channels, got shape {shape}",
            expected="(X, Y, Z, C) with C on the 4th axis",
        )
    if found != channels:
        raise InputDataError(
            path,
            f"image has {found} channel(s) on its 4th axis",
            got=f"shape {shape}",
            expected=f"{channels} channel(s), one per 'modality' entry of dataset.json (or per model input channel)",
        )
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def squeeze_shape(path: Path, shape: tuple[int, ...], channels: int = 1) -> tuple[int, int, int]:
    """The (X, Y, Z) grid of a header shape: 3D, trailing axes of size 1, or the channels on the 4th axis."""
    if any(d < 1 for d in shape):
        raise InputDataError(
            path, "header declares a non-positive dimension", got=f"shape {shape}", expected="all sizes >= 1"
        )
    if channels > 1:  # a 4D multi-channel file (MSD): the 4th axis holds exactly the channels
        return check_channel_axis(path, shape, channels)
    if len(shape) < 3 or any(d != 1 for d in shape[3:]):
        raise InputDataError(
            path, f"expected 3D, got shape {shape}", expected="one 3D volume per file (channels as separate files)"
        )
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def check_dtype(path: Path, dtype: np.dtype) -> np.dtype:
    """The stored data type if it is integer or floating-point scalar voxels (no complex, RGB, bool)."""
    dtype = np.dtype(dtype)
    if dtype.fields is not None or dtype.kind not in "iuf" or dtype.itemsize > 8:
        raise InputDataError(
            path,
            "unsupported data type",
            got=str(dtype),
            expected="integer or floating-point scalar voxels (no complex, RGB or bool)",
        )
    return dtype


def check_geometry(path: Path, affine: np.ndarray) -> tuple[float, float, float]:
    """The voxel spacing of a finite, non-singular voxel-to-world affine; anything else is refused."""
    if not np.all(np.isfinite(affine)):
        raise InputDataError(
            path, "voxel-to-world affine is not finite", got=np.round(affine[:3], 4).tolist(), expected="finite numbers"
        )
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    # 1e-6 relative: a 3x3 block this close to singular has no usable orientation.
    if abs(np.linalg.det(affine[:3, :3])) <= 1e-6 * float(np.prod(spacing)) or np.any(spacing <= 0):
        raise InputDataError(
            path,
            "voxel-to-world affine is singular",
            got=np.round(affine[:3, :3], 4).tolist(),
            expected="three independent axes",
        )
    return (float(spacing[0]), float(spacing[1]), float(spacing[2]))


def itk_affine(origin: Any, spacing: Any, direction: Any) -> np.ndarray:
    """RAS voxel -> world affine from ITK (LPS) origin, spacing and row-major 3x3 direction."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction, dtype=np.float64).reshape(3, 3) @ np.diag(np.asarray(spacing, dtype=np.float64))
    lps[:3, 3] = np.asarray(origin, dtype=np.float64)
    return LPS_TO_RAS @ lps


def itk_geometry(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """ITK (origin, spacing, row-major direction) of a RAS voxel -> world affine."""
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    return tuple(map(float, lps[:3, 3])), tuple(map(float, spacing)), tuple(map(float, direction.ravel()))
