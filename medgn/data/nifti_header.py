"""NIfTI header preflight: the raw NIfTI-1/2 header parsed with nibabel's repairs off, then checked.

This module owns :func:`open_nifti` (the fixed header of a ``.nii``/``.nii.gz`` read without
trusting it: size, magic, gzip readable) and :func:`nifti_header` (dimensions, data type, size
limits, intensity scaling, spacing, orientation codes, qform/sform agreement, voxel offset and,
for gzip, the whole stream: CRC32, length, no trailing data, see :mod:`medgn.data.gzipcheck`).
nibabel would turn zero spacing into 1, an invalid sform code into 0 and no orientation into an
invented affine; here each is refused, naming the file.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from medgn.data.gzipcheck import check_gzip
from medgn.data.header import HeaderInfo, Limits, check_dtype, check_geometry, check_size, squeeze_shape
from medgn.errors import InputDataError


def open_nifti(path: Path) -> tuple[Any, bool]:
    """The fixed NIfTI-1/2 header of ``path`` read without nibabel's repairs, and whether it is gzipped."""
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


def nifti_header(path: Path, limits: Limits, channels: int = 1) -> HeaderInfo:
    """The validated header of a ``.nii``/``.nii.gz`` (``channels`` > 1: a 4D multi-channel file)."""
    header, compressed = open_nifti(path)
    dims = [int(d) for d in header["dim"]]
    ndim = dims[0]
    if not 1 <= ndim <= 7:
        raise InputDataError(path, "header dim[0] is invalid", got=ndim, expected="1..7")
    shape = tuple(dims[1 : ndim + 1])
    shape3 = squeeze_shape(path, shape, channels)
    try:
        dtype = header.get_data_dtype()
    except Exception as exc:  # noqa: BLE001 - unknown datatype codes raise KeyError/HeaderDataError
        raise InputDataError(path, "unknown NIfTI data type", got=str(exc)) from None
    dtype = check_dtype(path, dtype)
    check_size(path, shape3, dtype.itemsize * channels, limits)
    # bitpix is not checked: nibabel and the NIfTI reference library (ITK) both size voxels by the data type.
    if np.isinf(float(header["scl_slope"])):  # NaN, 0: no scaling; inf: nibabel ignores it, others may not
        raise InputDataError(
            path,
            "invalid intensity scaling in header",
            got=f"scl_slope={float(header['scl_slope'])}",
            expected="a finite scl_slope, or 0 or NaN for none",
        )
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
    spacing = check_geometry(path, affine)
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
