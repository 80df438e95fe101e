"""Reading and writing volumes with their geometry intact.

This module owns :class:`Volume` (a 3D array in the file's voxel order plus its RAS voxel->world
affine and the header details a writer needs), :func:`read_volume` (header preflight, then pixels,
NaN/Inf and label checks), :func:`write_mask` / :func:`write_volume` (same format and geometry as a
reference volume, written atomically and re-read to check the geometry before publishing) and
:func:`geometry_diff`, the one geometry comparison verify, evaluation and inference use. NIfTI goes
through nibabel; NRRD, MetaImage and DICOM through SimpleITK, whose (z, y, x) arrays are transposed
to (x, y, z) and whose LPS geometry is converted to RAS.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from medgn.data.native import captured_native_stderr, itk_reason
from medgn.data.nifti_header import open_nifti
from medgn.data.preflight import (
    DEFAULT_LIMITS,
    NIFTI_SUFFIXES,
    HeaderInfo,
    Limits,
    detect_format,
    itk_affine,
    itk_geometry,
    read_header,
)
from medgn.errors import InputDataError, UsageError
from medgn.files import atomic_path, path_problem, path_sha256

__all__ = [
    "HeaderInfo",
    "Limits",
    "Volume",
    "geometry_diff",
    "read_header",
    "read_volume",
    "write_mask",
    "write_volume",
]

# Written geometry must equal the reference within this many mm (and unitless for direction
# cosines), plus GEOMETRY_REL_TOL of the values' size: far below any voxel size, above the float32
# rounding of a NIfTI header (7 significant digits: an origin of -1123.4 mm is stored 2.4e-5 mm off).
GEOMETRY_TOL = 1e-5
GEOMETRY_REL_TOL = 1e-6


@dataclass
class Volume:
    """A 3D image in file voxel order with its geometry.

    Attributes:
        array: (X, Y, Z) voxels in the file's i, j, k order.
        affine: 4x4 float64 voxel -> world in RAS mm.
        path: the file (or DICOM folder) it came from.
        format: "nifti", "nrrd", "mha" or "dicom".
        meta: what a writer needs to reproduce the header (NIfTI header and qform/sform codes, or
            ITK origin/spacing/direction in LPS).
        sha256: the input's sha256 when read with ``digest=True`` or from :func:`input_bytes`.
    """

    array: np.ndarray
    affine: np.ndarray
    path: Path
    format: str
    meta: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the array axes."""
        s = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(s[0]), float(s[1]), float(s[2]))

    @property
    def shape(self) -> tuple[int, int, int]:
        """The (X, Y, Z) array shape."""
        return tuple(int(d) for d in self.array.shape[:3])  # type: ignore[return-value]


class _Geometry(Protocol):
    shape: Any
    affine: np.ndarray


def geometry_diff(a: _Geometry, b: _Geometry, tol: float = GEOMETRY_TOL) -> list[str]:
    """Differences in shape, spacing, origin and direction between two volumes or headers.

    Args:
        a: a :class:`Volume` or :class:`HeaderInfo` (anything with ``shape`` and ``affine``).
        b: the same for the other image.
        tol: largest allowed difference (mm for spacing/origin, unitless for direction cosines).

    Returns:
        One readable line per differing property with both values and the largest difference;
        empty when they match (within ``tol`` plus :data:`GEOMETRY_REL_TOL` of the values' size).
    """
    diffs = []
    shape_a, shape_b = tuple(a.shape)[:3], tuple(b.shape)[:3]
    if shape_a != shape_b:
        diffs.append(f"shape {shape_a} vs {shape_b}")
    aff_a, aff_b = np.asarray(a.affine, dtype=np.float64), np.asarray(b.affine, dtype=np.float64)
    sp_a, sp_b = np.linalg.norm(aff_a[:3, :3], axis=0), np.linalg.norm(aff_b[:3, :3], axis=0)
    dir_a, dir_b = aff_a[:3, :3] / sp_a, aff_b[:3, :3] / sp_b
    for name, va, vb, unit in (
        ("spacing", sp_a, sp_b, " mm"),
        ("origin", aff_a[:3, 3], aff_b[:3, 3], " mm"),
        ("direction", dir_a.ravel(), dir_b.ravel(), ""),
    ):
        off = np.abs(va - vb)
        if np.any(off > tol + GEOMETRY_REL_TOL * np.maximum(np.abs(va), np.abs(vb))):
            diffs.append(f"{name} {_fmt(va)} vs {_fmt(vb)} (off by up to {float(off.max()):.3g}{unit})")
    return diffs


def _fmt(values: Iterable[float]) -> str:
    return "(" + ", ".join(f"{v + 0.0:.6g}" for v in values) + ")"  # + 0.0: -0 printed as 0


def _read_pixels(info: HeaderInfo, raw: bytes | None = None) -> np.ndarray:
    """The stored voxels as (X, Y, Z); any decoding failure becomes an InputDataError.

    ``raw`` (NIfTI only): the file's bytes, already read for hashing, decoded from memory.
    """
    path = info.path
    native: list[str] = []
    try:
        if info.format == "nifti":
            import nibabel as nib

            if raw is not None:
                cls = (
                    nib.Nifti2Image if isinstance(info.meta.get("nifti_header"), nib.Nifti2Header) else nib.Nifti1Image
                )
                img = cls.from_bytes(gzip.decompress(raw) if path.name.lower().endswith(".gz") else raw)
            else:
                img = nib.load(str(path))
            array = np.asanyarray(img.dataobj)  # applies scl_slope/inter only when set
            array = array.reshape(array.shape[:3])
        else:
            import SimpleITK as sitk

            with captured_native_stderr() as native:
                if info.format == "dicom":
                    reader = sitk.ImageSeriesReader()
                    reader.SetFileNames(info.meta["files"])
                    # Each slice rescaled by its own slope and intercept (Philips MR varies them) and
                    # signedness, into float: the first slice's integer type truncated or wrapped the rest.
                    reader.SetOutputPixelType(sitk.sitkFloat32)
                    image = reader.Execute()
                else:
                    image = sitk.ReadImage(str(path))
            zyx = sitk.GetArrayFromImage(image)  # (Z, Y, X), or (1, Z, Y, X) for a squeezed 4D
            array = zyx.reshape(zyx.shape[-3:]).transpose(2, 1, 0)
    except (EOFError, zlib.error, OSError, ValueError, RuntimeError, *nib_errors()) as exc:
        text = (
            itk_reason(exc, native)
            if info.format != "nifti"
            else (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        )
        raise InputDataError(path, "cannot read the voxel data (truncated or corrupt file?)", got=text[:200]) from None
    if array.shape != info.shape:
        raise InputDataError(
            path, "voxel data do not match the header", got=f"shape {array.shape}", expected=f"shape {info.shape}"
        )
    return np.ascontiguousarray(array)


def _check_label(path: Path, array: np.ndarray, label_values: Iterable[int] | None) -> np.ndarray:
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array)
        if bad.any():
            raise InputDataError(path, f"label has {int(bad.sum())} NaN/Inf voxels", expected="integer label values")
        fractional = array != np.round(array)
        if fractional.any():
            examples = np.unique(array[fractional])[:5].tolist()
            raise InputDataError(
                path,
                f"label has {int(fractional.sum())} non-integer voxels",
                got=f"values like {examples}",
                expected="integer label values (is this an image?)",
            )
    if array.size and (array.min() < np.iinfo(np.int32).min or array.max() > np.iinfo(np.int32).max):
        raise InputDataError(
            path, "label values out of range", got=f"{array.min()}..{array.max()}", expected="values that fit int32"
        )
    labels = array.astype(np.int32, copy=False)
    if label_values is not None:
        allowed = sorted({int(v) for v in label_values})
        found = np.unique(labels)
        extra = sorted(set(found.tolist()) - set(allowed))
        if extra:
            shown = found.tolist() if found.size <= 20 else found[:20].tolist() + ["..."]
            raise InputDataError(
                path,
                f"label has values outside the declared set: {extra[:20]}",
                got=f"values {shown}",
                expected=f"values in {allowed}",
            )
    return labels


def nib_errors() -> tuple[type[Exception], ...]:
    """nibabel's errors for undecodable image bytes (read from memory) and inconsistent headers."""
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError

    return ImageFileError, HeaderDataError


@dataclass(frozen=True)
class InputBytes:
    """An input's sha256 and, for a NIfTI file, its bytes (decoded later without a second read)."""

    path: Path
    sha256: str
    data: bytes | None


def input_bytes(path: str | os.PathLike[str]) -> InputBytes:
    """Read an input once for its sha256; a NIfTI file's bytes are kept for :func:`read_volume`.

    Other formats (read by SimpleITK from their files) and DICOM folders are hashed by
    :func:`medgn.files.path_sha256` and decoded from the files later.

    Raises:
        InputDataError: the input cannot be read (exit 3).
    """
    path = Path(path)
    problem = path_problem(path)
    if problem is not None:  # opening a FIFO or a device could block forever
        raise InputDataError(path, f"input is {problem}", expected="a regular file or a DICOM series folder")
    try:
        if path.is_file() and path.name.lower().endswith(NIFTI_SUFFIXES):
            data = path.read_bytes()
            return InputBytes(path, hashlib.sha256(data).hexdigest(), data)
        return InputBytes(path, path_sha256(path), None)
    except OSError as exc:
        raise InputDataError(path, f"cannot read input ({exc.strerror or exc})", expected="a readable file") from None


def read_volume(
    path: str | os.PathLike[str],
    limits: Limits = DEFAULT_LIMITS,
    *,
    label: bool = False,
    label_values: Iterable[int] | None = None,
    digest: bool = False,
    read: InputBytes | None = None,
) -> Volume:
    """Read a 3D image or label after validating its header.

    Args:
        path: a NIfTI, NRRD or MetaImage file, or a DICOM series folder.
        limits: size limits checked from the header before any pixel is read.
        label: read as a label map: integers (int32), never rounded from floats.
        label_values: when given (labels only), the values the label may contain.
        digest: also record the input's sha256 (``Volume.sha256``). A NIfTI file is read once:
            the same bytes are hashed and decoded; other formats are hashed by their files.
        read: what :func:`input_bytes` already read of this file (its bytes are decoded, not
            read again; its sha256 is recorded).

    Returns:
        The volume: float32 voxels for images, int32 for labels, in file voxel order.

    Raises:
        InputDataError: bad header, unreadable or truncated data, NaN/Inf voxels, non-integer or
            undeclared label values (exit 3).
        ResourceError: above a size limit (exit 5).
    """
    info = read_header(path, limits)
    if read is None and digest:
        read = input_bytes(info.path)
    raw = read.data if read is not None and info.format == "nifti" else None
    sha256 = read.sha256 if read is not None else None
    array = _read_pixels(info, raw)
    del raw
    if label:
        array = _check_label(info.path, array, label_values)
    else:
        with np.errstate(over="ignore"):  # overflow becomes Inf, which is counted below
            array = array.astype(np.float32, copy=False)
        # Counted after the cast: scl_slope can scale finite stored values beyond float32.
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise InputDataError(
                info.path,
                f"image has {bad} NaN/Inf voxels",
                got=f"shape {array.shape}",
                expected="finite intensities (check scl_slope/scl_inter and the data)",
            )
    return Volume(array, info.affine, info.path, info.format, dict(info.meta), sha256)


def _out_format(out_path: Path) -> str:
    if out_path.is_dir():
        raise UsageError(
            out_path, "output path is a folder", expected="a file name ending in .nii.gz, .nii, .nrrd or .mha"
        )
    fmt = detect_format(out_path)
    if fmt == "dicom":
        raise UsageError(out_path, "cannot write DICOM", expected=".nii.gz, .nii, .nrrd or .mha")
    return fmt


def _write(array: np.ndarray, reference: Volume, tmp: Path, fmt: str) -> None:
    """Write ``array`` (X, Y, Z[, C]) to ``tmp`` with the reference's geometry and header."""
    if fmt == "nifti":
        import nibabel as nib

        header = reference.meta.get("nifti_header") if reference.format == "nifti" else None
        if header is not None:
            header = header.copy()
            cls = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
            img = cls(array, None, header=header)  # affine None: keep qform/sform exactly
        else:
            img = nib.Nifti1Image(array, reference.affine)
            img.header.set_qform(reference.affine, code=1)  # 1 = scanner coordinates
            img.header.set_sform(reference.affine, code=1)
        img.header.set_data_dtype(array.dtype)
        img.header.set_slope_inter(1.0, 0.0)  # voxels are stored as they are, never rescaled
        img.header["cal_min"], img.header["cal_max"] = 0.0, 0.0
        nib.save(img, str(tmp))
    else:
        import SimpleITK as sitk

        if array.ndim != 3:
            raise UsageError(
                tmp.name,
                "only NIfTI can hold several channels",
                got=f"shape {array.shape}",
                expected="a .nii.gz output",
            )
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
        if reference.format in ("nrrd", "mha", "dicom"):
            origin, spacing, direction = (
                reference.meta["origin"],
                reference.meta["spacing"],
                reference.meta["direction"],
            )
        else:
            origin, spacing, direction = itk_geometry(reference.affine)
        image.SetOrigin(tuple(origin))
        image.SetSpacing(tuple(spacing))
        image.SetDirection(tuple(direction))
        sitk.WriteImage(image, str(tmp), True)  # True: compress (NRRD gzip, MHA zlib)


def _written_geometry(tmp: Path, fmt: str) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and RAS affine of a just-written file, from its raw header."""
    if fmt == "nifti":
        header, _ = open_nifti(tmp)
        ndim = int(header["dim"][0])
        return tuple(int(d) for d in header["dim"][1 : ndim + 1]), np.asarray(
            header.get_best_affine(), dtype=np.float64
        )
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(tmp))
    reader.ReadImageInformation()
    return tuple(reader.GetSize()), itk_affine(reader.GetOrigin(), reader.GetSpacing(), reader.GetDirection())


def _publish(array: np.ndarray, reference: Volume, out_path: str | os.PathLike[str], overwrite: bool) -> Path:
    out_path = Path(out_path)
    fmt = _out_format(out_path)
    if tuple(array.shape[:3]) != reference.shape:
        raise UsageError(
            out_path,
            "array shape differs from the reference volume",
            got=f"shape {array.shape}",
            expected=f"shape {reference.shape} (from {reference.path})",
        )
    with atomic_path(out_path, overwrite=overwrite) as tmp:
        _write(array, reference, tmp, fmt)
        shape, affine = _written_geometry(tmp, fmt)
        written = HeaderInfo(tmp, fmt, shape[:3], array.dtype, (0.0, 0.0, 0.0), affine)  # type: ignore[arg-type]
        diffs = geometry_diff(reference, written)
        if fmt == "nifti" and reference.format == "nifti":
            header, _ = open_nifti(tmp)
            codes = (int(header["qform_code"]), int(header["sform_code"]))
            if codes != (reference.meta["qform_code"], reference.meta["sform_code"]):
                diffs.append(
                    f"qform/sform codes {(reference.meta['qform_code'], reference.meta['sform_code'])} vs {codes}"
                )
        if tuple(shape[3:]) != tuple(array.shape[3:]) and not (array.ndim == 3 and all(d == 1 for d in shape[3:])):
            diffs.append(f"channels {array.shape[3:]} vs {shape[3:]}")
        if diffs:
            raise InputDataError(
                out_path,
                "written geometry differs from the input, nothing written: " + "; ".join(diffs),
                expected=f"the geometry of {reference.path}",
            )
    return out_path


def write_mask(
    mask: np.ndarray, reference: Volume, out_path: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write a label mask with exactly the reference's format and geometry, atomically.

    Args:
        mask: (X, Y, Z) integer (or integral float) labels >= 0 on the reference's voxel grid.
        reference: the input volume whose header and geometry the mask must reproduce.
        out_path: destination (.nii.gz/.nii/.nrrd/.mha); its folder must exist.
        overwrite: replace an existing file.

    Returns:
        The final path.

    Raises:
        UsageError: wrong shape, non-integer or negative labels, existing output without overwrite.
        InputDataError: the re-read geometry differs from the reference (nothing is written).
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise UsageError(out_path, "mask must be 3D", got=f"shape {mask.shape}", expected=f"shape {reference.shape}")
    if mask.dtype.kind not in "iub" and (mask.dtype.kind != "f" or not np.array_equal(mask, np.round(mask))):
        raise UsageError(out_path, "mask values must be integers", got=str(mask.dtype))
    top = int(mask.max()) if mask.size else 0
    if mask.size and int(mask.min()) < 0 or top > np.iinfo(np.uint16).max:
        raise UsageError(out_path, "mask values out of range", got=f"{int(mask.min())}..{top}", expected="0..65535")
    dtype = np.uint8 if top < 255 else np.uint16  # 255+ needs 16 bits; uint8 keeps masks small
    return _publish(mask.astype(dtype), reference, out_path, overwrite)


def write_volume(
    array: np.ndarray,
    reference: Volume,
    out_path: str | os.PathLike[str],
    *,
    dtype: Any = np.float32,
    overwrite: bool = False,
) -> Path:
    """Write an image or probability map with the reference's geometry, atomically.

    Args:
        array: (X, Y, Z) or, for NIfTI outputs, (X, Y, Z, C) values on the reference grid.
        reference: the volume whose geometry to reproduce.
        out_path: destination file; its folder must exist.
        dtype: stored data type (float32 by default).
        overwrite: replace an existing file.

    Returns:
        The final path.
    """
    array = np.asarray(array)
    if array.ndim not in (3, 4):
        raise UsageError(out_path, "array must be 3D or 4D (X, Y, Z, C)", got=f"shape {array.shape}")
    return _publish(array.astype(dtype), reference, out_path, overwrite)
