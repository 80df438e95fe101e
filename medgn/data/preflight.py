"""Header preflight: validate an image file's header before a single pixel is read.

This module owns :func:`read_header`, which picks the header reader of the file's format. The
header is untrusted: nibabel and ITK "repair" bad fields (zero spacing becomes 1, an invalid sform
code 0, no orientation an invented affine) and allocate the declared size before reading. So the
raw NIfTI header is parsed with nibabel's checks off (:mod:`medgn.data.nifti_header`), ITK formats
through ``ReadImageInformation`` (:mod:`medgn.data.itk_header`), and DICOM series slice by slice
from their tags (:mod:`medgn.data.dicom_header`); the limits, the :class:`HeaderInfo` record and the
checks they share are in :mod:`medgn.data.header`, whose names this module also offers. Every
failure is an :class:`~medgn.errors.InputDataError` (exit 3) or, for limits, a
:class:`~medgn.errors.ResourceError` (exit 5) naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

from medgn.data.detached import detached_data_files
from medgn.data.dicom_header import dicom_header, dicom_series_files, gdcm_series_ids
from medgn.data.header import (
    DEFAULT_LIMITS,
    ITK_SUFFIXES,
    LPS_TO_RAS,
    MASK_SUFFIXES,
    NIFTI_SUFFIXES,
    SUPPORTED,
    HeaderInfo,
    Limits,
    check_channel_axis,
    detect_format,
    itk_affine,
    itk_geometry,
)
from medgn.data.itk_header import itk_info, itk_reader
from medgn.data.nifti_header import nifti_header
from medgn.errors import InputDataError
from medgn.files import path_problem

__all__ = [
    "DEFAULT_LIMITS",
    "ITK_SUFFIXES",
    "LPS_TO_RAS",
    "MASK_SUFFIXES",
    "NIFTI_SUFFIXES",
    "SUPPORTED",
    "HeaderInfo",
    "Limits",
    "check_channel_axis",
    "detect_format",
    "dicom_series_files",
    "gdcm_series_ids",
    "itk_affine",
    "itk_geometry",
    "read_header",
]


def read_header(path: str | os.PathLike[str], limits: Limits = DEFAULT_LIMITS, *, channels: int = 1) -> HeaderInfo:
    """Validate an image's header without reading its pixels.

    Args:
        path: a NIfTI, NRRD or MetaImage file, or a folder holding one DICOM series.
        limits: voxel, byte and per-axis limits checked from the header alone.
        channels: above 1, a 4D NIfTI whose 4th axis holds exactly this many channels (MSD);
            ``shape`` stays the 3D grid and ``meta["channels"]`` records the count.

    Returns:
        The validated header.

    Raises:
        InputDataError: unreadable, not 3D, a detached data file outside the header's folder,
            bad spacing/affine/orientation, unsupported type, truncated or corrupt (gzip CRC32,
            length, trailing data) file, several DICOM series or missing slices (exit 3).
        ResourceError: above a size limit (exit 5).
    """
    path = Path(path)
    problem = path_problem(path)
    if problem is not None:  # a FIFO or a device is named, never opened: reading it could block
        raise InputDataError(
            path,
            "file not found" if problem == "not found" else f"input is {problem}",
            expected="an existing image file or DICOM folder",
        )
    fmt = detect_format(path)
    if fmt == "nifti":
        return nifti_header(path, limits, channels)
    if channels > 1:
        raise InputDataError(
            path,
            f"a {channels}-channel image in one file must be a 4D NIfTI",
            got=fmt,
            expected="a .nii/.nii.gz with the channels on the 4th axis, or one file per channel",
        )
    if fmt == "dicom":
        return dicom_header(path, limits)
    detached_data_files(path)  # before ITK follows a data file name out of the header's folder
    return itk_info(path, itk_reader(path), fmt, limits)
