"""Header preflight: validate an image file's header before a single pixel is read.

This module owns :class:`Limits`, :class:`HeaderInfo` and :func:`read_header`. The header is
untrusted: nibabel and ITK "repair" bad fields (zero spacing becomes 1, an invalid sform code 0,
no orientation an invented affine) and allocate the declared size before reading. So the raw NIfTI
header is parsed here with nibabel's checks off, ITK formats through ``ReadImageInformation`` (no
pixels), and DICOM series slice by slice from their tags. Dimensionality, voxel and byte limits,
spacing, affine, orientation codes, data type and (for gzip) the declared uncompressed size are
checked (gzip streams to their end: CRC32, length, no trailing data, see
:mod:`medgn.data.gzipcheck`), and every failure is an :class:`~medgn.errors.InputDataError` (exit 3) or, for limits, a
:class:`~medgn.errors.ResourceError` (exit 5) naming the file.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medgn.data.detached import detached_data_files, meta_compressed_stream
from medgn.data.gzipcheck import check_gzip, check_zlib
from medgn.data.native import captured_native_stderr, itk_reason
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


def _check_size(path: Path, shape: tuple[int, ...], itemsize: int, limits: Limits) -> None:
    if any(d > limits.max_dim for d in shape):
        raise ResourceError(
            path,
            "image dimension above the limit",
            got=f"shape {shape}",
            expected=f"each axis <= {limits.max_dim} (raise it with --max-dim)",
        )
    voxels = int(np.prod(np.asarray(shape, dtype=np.int64)))
    if voxels > limits.max_voxels:
        raise ResourceError(
            path,
            "image has too many voxels",
            got=f"shape {shape} = {voxels} voxels",
            expected=f"<= {limits.max_voxels} (raise it with --max-voxels)",
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


def _squeeze_shape(path: Path, shape: tuple[int, ...], channels: int = 1) -> tuple[int, int, int]:
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


def _check_dtype(path: Path, dtype: np.dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.fields is not None or dtype.kind not in "iuf" or dtype.itemsize > 8:
        raise InputDataError(
            path,
            "unsupported data type",
            got=str(dtype),
            expected="integer or floating-point scalar voxels (no complex, RGB or bool)",
        )
    return dtype


def _check_geometry(path: Path, affine: np.ndarray) -> tuple[float, float, float]:
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


def _open_nifti(path: Path) -> tuple[Any, bool]:
    import nibabel as nib

    compressed = path.name.lower().endswith(".gz")
    if path.stat().st_size == 0:
        raise InputDataError(path, "file is empty", expected="a NIfTI image")
    try:
        if compressed:
            with gzip.open(path, "rb") as handle:
                block = handle.read(540)
        else:
            with open(path, "rb") as handle:
                block = handle.read(540)
    except (gzip.BadGzipFile, OSError, EOFError, zlib.error) as exc:
        raise InputDataError(
            path,
            "cannot read the file as gzip-compressed NIfTI" if compressed else "cannot read the file",
            got=str(exc),
            expected="a valid .nii.gz (is it an uncompressed .nii?)" if compressed else None,
        ) from None
    if len(block) < 348:
        raise InputDataError(
            path, "file is too short for a NIfTI header", got=f"{len(block)} bytes", expected=">= 348 bytes"
        )
    sizes = {struct.unpack("<i", block[:4])[0], struct.unpack(">i", block[:4])[0]}
    if 348 in sizes:
        header_cls, size, magic, magics = nib.Nifti1Header, 348, block[344:348], (b"n+1\0", b"ni1\0")
    elif 540 in sizes:
        header_cls, size, magic, magics = nib.Nifti2Header, 540, block[4:12], (b"n+2\0\r\n\x1a\n", b"ni2\0\r\n\x1a\n")
    else:
        raise InputDataError(
            path, "not a NIfTI file", got="sizeof_hdr is neither 348 nor 540", expected="a NIfTI-1 or NIfTI-2 header"
        )
    if len(block) < size:
        raise InputDataError(
            path, "file is too short for a NIfTI-2 header", got=f"{len(block)} bytes", expected=">= 540 bytes"
        )
    if magic not in magics:
        raise InputDataError(
            path,
            "invalid NIfTI magic string",
            got=repr(magic.rstrip(b"\0")),
            expected=" or ".join(repr(m[:3]) for m in magics),
        )
    try:
        import io

        # The fixed header alone: extensions (of any size) are not needed to check the geometry,
        # and a mask written with this header carries none of the input's.
        header = header_cls.from_fileobj(io.BytesIO(block[:size] + bytes(4)), check=False)
    except Exception as exc:  # noqa: BLE001 - nibabel raises several types for corrupt headers
        raise InputDataError(path, "corrupt NIfTI header", got=str(exc)) from None
    return header, compressed


def _check_xforms(path: Path, header: Any, qcode: int, scode: int) -> None:
    """Refuse a header that readers would turn into different geometries.

    nibabel takes the sform when ``sform_code > 0``; ITK takes the spacing from pixdim and, unless
    ``sform_code`` is 1, the qform. So pixdim must match the sform's column lengths and, when both
    codes are set, the qform must equal the sform.
    """
    if scode <= 0:
        return
    sform = np.asarray(header.get_sform(), dtype=np.float64)
    lengths = np.linalg.norm(sform[:3, :3], axis=0)
    pixdim = np.asarray(header["pixdim"][1:4], dtype=np.float64)
    # 1e-4 relative: far above float32 rounding of one geometry, far below any real disagreement.
    if np.any(np.abs(lengths - pixdim) > 1e-4 * pixdim):
        raise InputDataError(
            path,
            "voxel spacing in pixdim differs from the sform's (readers would disagree)",
            got=f"pixdim {pixdim.tolist()}, sform {np.round(lengths, 6).tolist()}",
            expected="the same spacing",
        )
    if qcode > 0:
        try:
            qform = np.asarray(header.get_qform(), dtype=np.float64)
        except Exception as exc:  # noqa: BLE001 - an invalid quaternion raises inside nibabel
            raise InputDataError(
                path,
                f"invalid qform quaternion ({exc})",
                got=f"quatern_b/c/d {[float(header[k]) for k in ('quatern_b', 'quatern_c', 'quatern_d')]}",
                expected="b*b + c*c + d*d <= 1, or qform_code=0",
            ) from None
        # 1e-3 mm: float32 storage of one geometry in both forms agrees to ~1e-5 mm.
        diff = float(np.max(np.abs(qform - sform))) if np.all(np.isfinite(qform)) else float("inf")
        if diff > 1e-3:
            raise InputDataError(
                path,
                "qform and sform disagree (readers would pick different geometries)",
                got=f"qform_code={qcode}, sform_code={scode}, max difference {diff:.4g}",
                expected="the same affine within 0.001 mm, or one of the codes 0",
            )


def _vox_offset(path: Path, header: Any) -> int:
    """The raw ``vox_offset``: a finite whole number of bytes after the header (and extensions)."""
    raw = float(np.asarray(header.structarr["vox_offset"]))
    minimum = int(header.single_vox_offset)  # 352 (NIfTI-1) or 544 (NIfTI-2): header + extender
    if not np.isfinite(raw) or raw != int(raw) or raw < minimum:
        raise InputDataError(
            path,
            "invalid voxel data offset in header",
            got=f"vox_offset={raw}",
            expected=f"a whole number of bytes >= {minimum}",
        )
    return int(raw)


def _nifti_header(path: Path, limits: Limits, channels: int = 1) -> HeaderInfo:
    header, compressed = _open_nifti(path)
    dims = [int(d) for d in header["dim"]]
    ndim = dims[0]
    if not 1 <= ndim <= 7:
        raise InputDataError(path, "header dim[0] is invalid", got=ndim, expected="1..7")
    shape = tuple(dims[1 : ndim + 1])
    shape3 = _squeeze_shape(path, shape, channels)
    try:
        dtype = header.get_data_dtype()
    except Exception as exc:  # noqa: BLE001 - unknown datatype codes raise KeyError/HeaderDataError
        raise InputDataError(path, "unknown NIfTI data type", got=str(exc)) from None
    dtype = _check_dtype(path, dtype)
    _check_size(path, shape3, dtype.itemsize * channels, limits)
    try:
        header.get_slope_inter()
    except Exception:  # noqa: BLE001 - nibabel's HeaderDataError: a valid slope, a non-finite intercept
        raise InputDataError(
            path,
            "invalid intensity scaling in header",
            got=f"scl_slope={float(header['scl_slope'])}, scl_inter={float(header['scl_inter'])}",
            expected="a finite scl_inter when scl_slope is set",
        ) from None
    pixdim = np.asarray(header["pixdim"], dtype=np.float64)
    if not np.all(np.isfinite(pixdim[1:4])) or np.any(pixdim[1:4] <= 0):
        raise InputDataError(
            path,
            "voxel spacing is not positive and finite",
            got=f"pixdim {pixdim[1:4].tolist()}",
            expected="three finite values > 0",
        )
    qcode, scode = int(header["qform_code"]), int(header["sform_code"])
    if qcode not in range(6) or scode not in range(6):
        raise InputDataError(
            path, "invalid orientation code", got=f"qform_code={qcode}, sform_code={scode}", expected="codes 0..5"
        )
    if qcode == 0 and scode == 0:
        raise InputDataError(
            path, "no orientation in header", got="qform_code=0, sform_code=0", expected="qform_code or sform_code > 0"
        )
    try:
        affine = np.asarray(header.get_best_affine(), dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - NaN quaternions raise inside nibabel
        quatern = [float(header[k]) for k in ("quatern_b", "quatern_c", "quatern_d")]
        raise InputDataError(
            path,
            f"cannot build the voxel-to-world affine from the qform quaternion ({exc})",
            got=f"quatern_b/c/d {quatern}",
            expected="b*b + c*c + d*d <= 1",
        ) from None
    spacing = _check_geometry(path, affine)
    _check_xforms(path, header, qcode, scode)
    offset = _vox_offset(path, header)
    needed = offset + int(np.prod(shape3)) * channels * dtype.itemsize
    if compressed:
        check_gzip(path, needed, f"shape {shape3} x {channels} channel(s) {dtype}")
    elif path.stat().st_size < needed:
        raise InputDataError(
            path,
            "file is truncated",
            got=f"{path.stat().st_size} bytes",
            expected=f">= {needed} bytes for shape {shape3} {dtype}",
        )
    meta = {
        "nifti_header": header,
        "qform_code": qcode,
        "sform_code": scode,
        "squeezed": len(shape) != 3,
        "channels": channels,
    }
    return HeaderInfo(path, "nifti", shape3, dtype, spacing, affine, meta)


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


def _itk_reader(path: Path) -> Any:
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


def _itk_info(path: Path, reader: Any, fmt: str, limits: Limits) -> HeaderInfo:
    import SimpleITK as sitk

    size = tuple(int(s) for s in reader.GetSize())
    shape3 = _squeeze_shape(path, size)
    name = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    if reader.GetNumberOfComponents() != 1 or name not in _ITK_DTYPES:
        raise InputDataError(
            path,
            "unsupported data type",
            got=f"{name}, {reader.GetNumberOfComponents()} components",
            expected="integer or floating-point scalar voxels (no complex, RGB or vector)",
        )
    dtype = np.dtype(_ITK_DTYPES[name])
    _check_size(path, shape3, dtype.itemsize, limits)
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
    ndim = len(size)
    spacing = np.asarray(reader.GetSpacing(), dtype=np.float64)[:3]
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputDataError(
            path, "voxel spacing is not positive and finite", got=spacing.tolist(), expected="three finite values > 0"
        )
    origin = np.asarray(reader.GetOrigin(), dtype=np.float64)[:3]
    direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(ndim, ndim)[:3, :3]
    affine = itk_affine(origin, spacing, direction)
    _check_geometry(path, affine)
    meta = {
        "origin": tuple(origin.tolist()),
        "spacing": tuple(spacing.tolist()),
        "direction": tuple(direction.ravel().tolist()),
        "squeezed": ndim != 3,
    }
    return HeaderInfo(path, fmt, shape3, dtype, tuple(map(float, spacing)), affine, meta)


def dicom_series_files(path: Path) -> list[str]:
    """The files of the single DICOM series in folder ``path``, in slice order."""
    series = gdcm_series_ids(path)
    if not series:
        raise InputDataError(
            path, "folder holds no DICOM series", expected=f"a DICOM series folder or a file ({SUPPORTED})"
        )
    if len(series) > 1:
        listing = "; ".join(f"{sid} ({len(_gdcm_files(path, sid))} files)" for sid in series)
        raise InputDataError(
            path, f"folder holds {len(series)} DICOM series: {listing}", expected="exactly one series per folder"
        )
    return _gdcm_files(path, series[0])


def gdcm_series_ids(path: Path) -> list[str]:
    """The DICOM series GDCM finds in folder ``path`` (its console notices caught, not printed)."""
    import SimpleITK as sitk

    native: list[str] = []
    try:
        with captured_native_stderr() as native:
            return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))
    except RuntimeError as exc:
        raise InputDataError(path, "cannot scan the folder for DICOM series", got=itk_reason(exc, native)) from None


def _gdcm_files(path: Path, series: str) -> list[str]:
    import SimpleITK as sitk

    native: list[str] = []
    try:
        with captured_native_stderr() as native:
            return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series))
    except RuntimeError as exc:
        raise InputDataError(
            path, f"cannot list the files of DICOM series {series}", got=itk_reason(exc, native)
        ) from None


def _dicom_numbers(reader: Any, name: str, tag: str, label: str, count: int) -> np.ndarray:
    """``count`` finite numbers of a slice's backslash-separated DS tag, else exit 3 naming it."""
    try:
        raw = reader.GetMetaData(tag)
    except RuntimeError:
        raise InputDataError(name, f"DICOM slice has no {label} ({tag.replace('|', ',')})") from None
    try:
        values = np.asarray([float(v) for v in raw.split("\\")], dtype=np.float64)
    except ValueError:
        values = np.asarray([], dtype=np.float64)
    if values.shape != (count,) or not np.all(np.isfinite(values)):
        raise InputDataError(
            name,
            f"invalid {label} ({tag.replace('|', ',')})",
            got=raw.strip()[:120],
            expected=f"{count} finite numbers",
        )
    return values


def _slice_geometry(reader: Any, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(position, orientation (2, 3), pixel spacing) of one slice, each checked.

    ITK would read a slice without PixelSpacing as 1 mm and one with an invalid orientation as
    axial; medgn refuses both instead of guessing.
    """
    position = _dicom_numbers(reader, name, "0020|0032", "ImagePositionPatient", 3)
    orientation = _dicom_numbers(reader, name, "0020|0037", "ImageOrientationPatient", 6).reshape(2, 3)
    spacing = _dicom_numbers(reader, name, "0028|0030", "PixelSpacing", 2)
    norms = np.linalg.norm(orientation, axis=1)
    if np.any(np.abs(norms - 1) > 1e-3) or abs(float(orientation[0] @ orientation[1])) > 1e-3:
        raise InputDataError(
            name,
            "invalid ImageOrientationPatient (0020,0037)",
            got=orientation.ravel().tolist(),
            expected="two orthogonal unit vectors",
        )
    if np.any(spacing <= 0):
        raise InputDataError(name, "invalid PixelSpacing (0028,0030)", got=spacing.tolist(), expected="values > 0")
    return position, orientation, spacing


def _check_pixel_data(name: str) -> None:
    """An uncompressed slice's PixelData holds every byte its Rows x Columns declare.

    GDCM pads a short PixelData with zeros and reads the slice without a word; pydicom reads the
    element's header only (its value stays on disk).
    """
    import pydicom
    from pydicom.dataelem import RawDataElement

    try:
        ds = pydicom.dcmread(name, defer_size=256, force=True)
        syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        if syntax is not None and syntax.is_compressed:
            return  # encapsulated frames: their decoder checks them
        element = ds.get_item(0x7FE00010)
        if element is None:
            return  # the series reader refuses a slice without pixels
        declared = int(element.length) if isinstance(element, RawDataElement) else len(element.value)
        needed = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8
        stored = os.path.getsize(name) - int(getattr(element, "value_tell", 0) or 0)
    except Exception:  # noqa: BLE001 - what pydicom cannot parse, ITK's reader has judged already
        return
    if declared < needed or (isinstance(element, RawDataElement) and stored < declared):
        raise InputDataError(
            name,
            "DICOM slice's PixelData is shorter than its Rows x Columns (truncated file?)",
            got=f"{min(declared, stored)} bytes",
            expected=f"{needed} bytes",
        )


def _dicom_header(path: Path, limits: Limits) -> HeaderInfo:
    files = dicom_series_files(path)
    positions = []
    first = None
    for name in files:
        reader = _itk_reader(Path(name))
        position, orientation, pixel = _slice_geometry(reader, name)
        _check_pixel_data(name)
        if first is None:
            first, orientation0, pixel0 = reader, orientation, pixel
        elif np.max(np.abs(orientation - orientation0)) > 1e-3 or np.max(np.abs(pixel - pixel0)) > 1e-3 * pixel0.max():
            raise InputDataError(
                name,
                "DICOM slices differ in orientation or pixel spacing",
                got=f"{orientation.ravel().tolist()}, {pixel.tolist()}",
                expected=f"{orientation0.ravel().tolist()}, {pixel0.tolist()} (as {files[0]})",
            )
        positions.append(position)
    assert first is not None  # dicom_series_files never returns an empty list
    info = _itk_info(path, first, "dicom", limits)
    direction = np.asarray(info.meta["direction"]).reshape(3, 3)
    normal = direction[:, 2]
    along = np.sort(np.asarray(positions) @ normal)
    shape3 = (info.shape[0], info.shape[1], len(files))
    _check_size(path, shape3, info.dtype.itemsize, limits)
    # Every slice on the line through the first along the normal: a gantry tilt or a shifted slice
    # would be stacked as if straight (a quarter of a pixel is rounding of exported positions).
    offsets = np.asarray(positions) - positions[0]
    inplane = np.abs(offsets @ direction[:, :2])
    if np.any(inplane > 0.25 * np.asarray(info.spacing[:2])):
        worst = int(np.argmax(inplane.max(axis=1)))
        raise InputDataError(
            files[worst],
            "DICOM slice is shifted within its plane (gantry tilt or a sheared series)",
            got=f"{inplane[worst].round(3).tolist()} mm from the first slice's line",
            expected="slices stacked along the normal of their plane",
        )
    if len(files) > 1:
        steps = np.diff(along)
        step = float(np.median(steps))
        # 1% of the slice step (or 1 micrometre): rounding in exported positions, not a missing slice.
        tolerance = max(0.01 * abs(step), 1e-3)
        if step <= 0 or np.any(np.abs(steps - step) > tolerance):
            gaps = [f"{along[i]:.3f}->{along[i + 1]:.3f} mm" for i in np.flatnonzero(np.abs(steps - step) > tolerance)]
            raise InputDataError(
                path,
                f"DICOM series has missing or uneven slices: {', '.join(gaps[:10])}",
                got=f"{len(files)} slices",
                expected=f"uniform slice step {step:.4f} mm",
            )
        spacing = (info.spacing[0], info.spacing[1], abs(step))
    else:
        spacing = info.spacing
    origin = np.asarray(positions[int(np.argmin(np.asarray(positions) @ normal))])
    affine = itk_affine(origin, spacing, direction)
    meta = {
        "origin": tuple(origin.tolist()),
        "spacing": spacing,
        "direction": tuple(direction.ravel().tolist()),
        "files": files,
        "squeezed": False,
    }
    return HeaderInfo(path, "dicom", shape3, info.dtype, spacing, affine, meta)


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
    if not path.exists():
        raise InputDataError(path, "file not found", expected="an existing image file or DICOM folder")
    fmt = detect_format(path)
    if fmt == "nifti":
        return _nifti_header(path, limits, channels)
    if channels > 1:
        raise InputDataError(
            path,
            f"a {channels}-channel image in one file must be a 4D NIfTI",
            got=fmt,
            expected="a .nii/.nii.gz with the channels on the 4th axis, or one file per channel",
        )
    if fmt == "dicom":
        return _dicom_header(path, limits)
    detached_data_files(path)  # before ITK follows a data file name out of the header's folder
    return _itk_info(path, _itk_reader(path), fmt, limits)
