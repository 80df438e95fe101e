"""DICOM series header preflight: one series per folder, every slice's geometry checked from its tags.

This module owns :func:`dicom_series_files` and :func:`gdcm_series_ids` (the series GDCM finds in a
folder, its notices caught) and :func:`dicom_header`: every slice's position, orientation and pixel
spacing read and checked (ITK would read a slice without PixelSpacing as 1 mm), truncated PixelData
found, then the stack checked for gantry tilt, missing or uneven slices before a pixel is read.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from medgn.data.header import SUPPORTED, HeaderInfo, Limits, check_size, itk_affine
from medgn.data.itk_header import itk_info, itk_reader
from medgn.data.native import captured_native_stderr, itk_reason
from medgn.errors import InputDataError
from medgn.files import path_problem


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
    _refuse_split_series(path, series[0])
    return _gdcm_files(path, series[0])


def _refuse_split_series(path: Path, series: str) -> None:
    """Refuse a series that continues in a subfolder: read from ``path`` alone it would be a volume of
    part of its slices, with no gap to show it (an export splits a long series into folders)."""
    try:
        subfolders = sorted(e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=False))
    except OSError:
        return
    for sub in subfolders:
        try:
            found = gdcm_series_ids(Path(sub))
        except InputDataError:
            continue  # a subfolder GDCM cannot list holds no slice of this series it could read
        if series in found:
            raise InputDataError(
                path,
                f"DICOM series {series} continues in subfolder {Path(sub).name} "
                f"({len(_gdcm_files(Path(sub), series))} more files)",
                expected="all slices of the series in one folder",
            )


def gdcm_series_ids(path: Path) -> list[str]:
    """The DICOM series GDCM finds in folder ``path`` (its console notices caught, not printed).

    Raises:
        InputDataError: the folder holds an entry that is neither a file nor a folder (a FIFO, a
            device, a link that leads nowhere): GDCM stops listing the folder there, so the slices
            after it would silently be missing from the series.
    """
    import SimpleITK as sitk

    odd = _odd_entries(path)
    if odd:
        raise InputDataError(
            path,
            f"folder holds {len(odd)} entr{'y' if len(odd) == 1 else 'ies'} that no DICOM reader can list past: "
            + ", ".join(odd[:5]),
            expected="only files and folders in a DICOM series folder (remove the others)",
        )

    native: list[str] = []
    try:
        with captured_native_stderr() as native:
            return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))
    except RuntimeError as exc:
        raise InputDataError(path, "cannot scan the folder for DICOM series", got=itk_reason(exc, native)) from None


def _odd_entries(path: Path) -> list[str]:
    """Entries of folder ``path`` that are neither regular files nor folders, each with what it is."""
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError:
        return []  # an unreadable folder: GDCM says so in its own words
    return [f"{e.name} ({path_problem(e.path)})" for e in entries if path_problem(e.path) is not None]


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


def _tag(reader: Any, key: str) -> str:
    return str(reader.GetMetaData(key)).strip() if reader.HasMetaDataKey(key) else ""


def _positive(reader: Any, key: str) -> float | None:
    """A tag's value as a positive finite number (SpacingBetweenSlices, SliceThickness), or None."""
    try:
        value = float(_tag(reader, key).split("\\")[0])
    except ValueError:
        return None
    return value if np.isfinite(value) and value > 0 else None


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


def _check_one_plane(planes: list[tuple[str, np.ndarray, np.ndarray, str]]) -> None:
    """Refuse slices whose size, orientation or pixel spacing differ from most of the series'.

    The slice named is one outside the majority, so a localizer (scout) image that sorts first is
    named itself instead of the first good slice after it.
    """
    key = [(size, tuple(np.round(o.ravel(), 3)), tuple(np.round(p, 3))) for _, o, p, size in planes]
    common, count = Counter(key).most_common(1)[0]
    _, orientation0, pixel0, size0 = planes[key.index(common)]
    share = f"as {count} of {len(planes)} slices, e.g. {planes[key.index(common)][0]}"
    for name, orientation, pixel, size in planes:
        if size != size0:
            raise InputDataError(
                name, "DICOM slices differ in size (Columns x Rows)", got=size, expected=f"{size0} ({share})"
            )
        if np.max(np.abs(orientation - orientation0)) > 1e-3 or np.max(np.abs(pixel - pixel0)) > 1e-3 * pixel0.max():
            raise InputDataError(
                name,
                "DICOM slices differ in orientation or pixel spacing (a localizer in the series?)",
                got=f"{orientation.ravel().tolist()}, {pixel.tolist()}",
                expected=f"{orientation0.ravel().tolist()}, {pixel0.tolist()} ({share})",
            )


def dicom_header(path: Path, limits: Limits) -> HeaderInfo:
    """The validated header of the one DICOM series in folder ``path``, every slice checked from its tags."""
    files = dicom_series_files(path)
    positions = []
    planes: list[tuple[str, np.ndarray, np.ndarray, str]] = []  # file, orientation, pixel spacing, size
    first = None
    for name in files:
        reader = itk_reader(Path(name))
        frames = _positive(reader, "0028|0008")  # NumberOfFrames
        if frames is not None and frames > 1:  # its per-frame positions are not in the slice tags read here
            raise InputDataError(
                name,
                f"multi-frame DICOM ({int(frames)} frames in one file, e.g. Enhanced CT/MR) is not read",
                expected="a classic series, one file per slice (convert it, e.g. with dcm2niix)",
            )
        position, orientation, pixel = _slice_geometry(reader, name)
        _check_pixel_data(name)
        if _tag(reader, "0028|0004").upper() == "MONOCHROME1":
            # GDCM inverts such slices' stored values: HU or MR intensities would come out turned over.
            raise InputDataError(
                name,
                "MONOCHROME1 slices are not read: their stored values would come out inverted",
                expected="a MONOCHROME2 series (PhotometricInterpretation 0028,0004)",
            )
        size = "x".join(map(str, tuple(reader.GetSize())[:2]))  # Columns x Rows
        if first is None:
            first = reader
        planes.append((name, orientation, pixel, size))
        positions.append(position)
    assert first is not None  # dicom_series_files never returns an empty list
    _check_one_plane(planes)
    info = itk_info(path, first, "dicom", limits)
    direction = np.asarray(info.meta["direction"]).reshape(3, 3)
    normal = direction[:, 2]
    order = np.argsort(np.asarray(positions) @ normal, kind="stable")
    along = (np.asarray(positions) @ normal)[order]
    shape3 = (info.shape[0], info.shape[1], len(files))
    check_size(path, shape3, info.dtype.itemsize, limits)
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
        if step <= tolerance:  # most neighbours at one place: several images of one slice, not a volume
            stacked = int(np.count_nonzero(steps <= tolerance)) + 1
            raise InputDataError(
                path,
                f"DICOM series has {stacked} of its {len(files)} slices at the same position",
                got=f"positions along the slice normal {along[0]:.3f}..{along[-1]:.3f} mm",
                expected="one slice per position (a time series or several echoes goes in separate folders)",
            )
        twins = np.flatnonzero(steps <= tolerance)
        if twins.size:  # a few slices where another one is: duplicates, not a gap
            i = int(twins[0])
            raise InputDataError(
                path,
                f"DICOM series has {twins.size} slice(s) at the position of another: "
                f"{Path(files[order[i]]).name} and {Path(files[order[i + 1]]).name} at {along[i]:.3f} mm",
                expected="one slice per position (remove the duplicate)",
            )
        if np.any(np.abs(steps - step) > tolerance):
            gaps = [f"{along[i]:.3f}->{along[i + 1]:.3f} mm" for i in np.flatnonzero(np.abs(steps - step) > tolerance)]
            raise InputDataError(
                path,
                f"DICOM series has missing or uneven slices: {', '.join(gaps[:10])}",
                got=f"{len(files)} slices",
                expected=f"uniform slice step {step:.4f} mm",
            )
        spacing = (info.spacing[0], info.spacing[1], abs(step))
    else:  # one slice: the step it stands for, as its tags give it (ITK would say 1 mm)
        thickness = next(
            (v for v in (_positive(first, "0018|0088"), _positive(first, "0018|0050")) if v is not None), 1.0
        )
        spacing = (info.spacing[0], info.spacing[1], thickness)
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
