"""NRRD and MetaImage header preflight through ITK's ``ReadImageInformation`` (no pixels read).

This module owns :func:`itk_reader` (an ITK reader with the header read, ITK's console notices
caught) and :func:`itk_info` (data type, size limits, a compressed MetaImage stream checked to its
end, a NRRD's anatomical orientation required, spacing and affine checked). ITK invents an
identity orientation for a NRRD without ``space``, takes the axes of a non-anatomical space
(``scanner-xyz``, ``3D-right-handed``) as patient axes and reads a short compressed stream as zeros;
all are refused here, naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medgn.data.detached import meta_compressed_stream
from medgn.data.gzipcheck import check_zlib
from medgn.data.header import HeaderInfo, Limits, check_geometry, check_size, itk_affine, squeeze_shape
from medgn.data.native import captured_native_stderr, itk_reason
from medgn.errors import InputDataError


def itk_reader(path: Path) -> Any:
    """An ITK reader of ``path`` with its header (only) read; ITK's console notices caught."""
    import SimpleITK as sitk

    if path.stat().st_size == 0:
        raise InputDataError(path, "file is empty", expected="an image file")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    native: list[str] = []
    try:
        with captured_native_stderr() as native:
            reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputDataError(path, "cannot read the image header", got=itk_reason(exc, native)) from None
    return reader


# The NRRD spaces with anatomical axes, as ITK reports them (it names RAS and LPS files alike by
# the LPS directions it converts them to).
ANATOMICAL_SPACES = frozenset({"left-posterior-superior", "right-anterior-superior", "left-anterior-superior"})

_ITK_DTYPES = {
    "8-bit unsigned integer": np.uint8,
    "8-bit signed integer": np.int8,
    "16-bit unsigned integer": np.uint16,
    "16-bit signed integer": np.int16,
    "32-bit unsigned integer": np.uint32,
    "32-bit signed integer": np.int32,
    "64-bit unsigned integer": np.uint64,
    "64-bit signed integer": np.int64,
    "32-bit float": np.float32,
    "64-bit float": np.float64,
}


def itk_info(path: Path, reader: Any, fmt: str, limits: Limits) -> HeaderInfo:
    """The validated header of a NRRD, MetaImage or (first slice of a) DICOM file from its ITK reader."""
    import SimpleITK as sitk

    size = tuple(int(s) for s in reader.GetSize())
    shape3 = squeeze_shape(path, size)
    name = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    if reader.GetNumberOfComponents() != 1 or name not in _ITK_DTYPES:
        raise InputDataError(
            path,
            "unsupported data type",
            got=f"{name}, {reader.GetNumberOfComponents()} components",
            expected="integer or floating-point scalar voxels (no complex, RGB or vector)",
        )
    dtype = np.dtype(_ITK_DTYPES[name])
    check_size(path, shape3, dtype.itemsize, limits)
    stream = meta_compressed_stream(path) if fmt == "mha" else None
    if stream is not None:  # ITK reads a short or corrupt stream as zeros without a word
        check_zlib(stream[0], stream[1], int(np.prod(size)) * dtype.itemsize, f"shape {shape3} {dtype}")
    if fmt == "nrrd" and not reader.HasMetaDataKey("NRRD_space"):
        # Without a space field ITK invents an identity orientation: refuse rather than guess.
        raise InputDataError(
            path,
            "no orientation in header",
            got="no 'space' field",
            expected="a NRRD with 'space' and 'space directions'",
        )
    space = reader.GetMetaData("NRRD_space") if fmt == "nrrd" else None
    if space is not None and space not in ANATOMICAL_SPACES:
        # scanner-xyz and 3D-right/left-handed axes have no patient orientation; ITK takes them as LPS.
        raise InputDataError(
            path,
            "no patient orientation in header",
            got=f"space: {space}",
            expected="a NRRD in an anatomical space (right-anterior-superior, left-anterior-superior or "
            "left-posterior-superior)",
        )
    ndim = len(size)
    spacing = np.asarray(reader.GetSpacing(), dtype=np.float64)[:3]
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputDataError(
            path, "voxel spacing is not positive and finite", got=spacing.tolist(), expected="three finite values > 0"
        )
    origin = np.asarray(reader.GetOrigin(), dtype=np.float64)[:3]
    direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(ndim, ndim)[:3, :3]
    affine = itk_affine(origin, spacing, direction)
    check_geometry(path, affine)
    meta = {
        "origin": tuple(origin.tolist()),
        "spacing": tuple(spacing.tolist()),
        "direction": tuple(direction.ravel().tolist()),
        "squeezed": ndim != 3,
    }
    return HeaderInfo(path, fmt, shape3, dtype, tuple(map(float, spacing)), affine, meta)
