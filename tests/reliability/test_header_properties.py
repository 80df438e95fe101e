"""Property-based tests over raw NIfTI-1 header fields: read identically by both readers, or refused.

Hypothesis patches pixdim (0, negative, NaN, Inf, tiny, huge), qfac, qform/sform codes, the quaternion
and its offsets, the three srow rows, dim (including huge and negative sizes) and datatype codes
into the raw bytes of a tiny valid file. For every example :func:`medgn.data.io.read_volume` either
reads it -- and then SimpleITK, where it accepts the file too, sees the same shape and voxel-to-world
geometry -- or raises a code-3 (5 for limits) error naming the file and the field. Never another
exception, never a hang (an alarm fails the example), never an allocation beyond a few MiB
(tracemalloc sees numpy's buffers).
"""

from __future__ import annotations

import signal
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medgn.data.io import Limits, read_volume
from medgn.data.native import captured_native_stderr
from medgn.data.preflight import itk_affine
from medgn.errors import MedgnError
from tests.reliability.conftest import AFFINE, image_array, patch_nifti_fields, write_nifti

# Limits far above the 720-voxel fixture and far below what a corrupt header could ask for.
LIMITS = Limits(max_voxels=10**6, max_bytes=8 * 10**6, max_dim=4096)
# Peak traced allocation allowed while reading one example: the fixture is 3 KB, limits are 8 MB.
PEAK_BYTES = 32 << 20
# Seconds one example may take before it counts as a hang.
HANG_S = 30
# Geometry agreement between nibabel's and SimpleITK's reading of the same header, in mm
# (float32 header fields).
TOL = 1e-4

SPECIAL = [0.0, -0.0, -1.5, float("nan"), float("inf"), float("-inf"), 1e-30, 1e30]
floats = st.one_of(st.sampled_from(SPECIAL), st.floats(-50, 50, allow_nan=False, width=32))
spacings = st.one_of(st.sampled_from(SPECIAL), st.floats(0.0625, 5, width=32))
quaternions = st.one_of(
    st.sampled_from([0.0, 1.0, -1.0, 1.5, float("nan"), float("inf")]), st.floats(-0.75, 0.75, width=32)
)
codes = st.integers(-2, 8)
sizes = st.one_of(st.sampled_from([0, -1, 1, 5, 10, 20, 4097, 30000, 32767]), st.integers(1, 12))
DATATYPES = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 9999, -1]

# Words an error about each field may use (it must use one of the patched fields' words).
FIELD_WORDS: dict[str, tuple[str, ...]] = {
    "pixdim": ("pixdim", "spacing", "affine", "singular", "qform"),
    "qform_code": ("orientation", "qform", "affine", "singular", "spacing"),
    "sform_code": ("orientation", "sform", "affine", "singular", "spacing"),
    "quatern": ("quatern", "affine", "singular", "qform"),
    "qoffset": ("affine", "qoffset", "qform"),
    "srow": ("affine", "singular", "srow", "spacing"),
    "dim": ("dim", "shape", "3d", "voxels", "limit", "truncated", "too large"),
    "datatype": ("data type", "truncated", "too large", "nan/inf"),
}


@st.composite
def header_patches(draw: st.DrawFn) -> dict[str, Any]:
    """A random subset of raw header fields with adversarial values."""
    patches: dict[str, Any] = {}
    if draw(st.booleans()):
        patches["pixdim"] = (
            draw(st.sampled_from([1.0, -1.0, 0.0, 0.5, float("nan")])),
            *[draw(spacings) for _ in range(3)],
            1.0,
            1.0,
            1.0,
            1.0,
        )
    for code in ("qform_code", "sform_code"):
        if draw(st.booleans()):
            patches[code] = draw(codes)
    if draw(st.booleans()):
        for name in ("quatern_b", "quatern_c", "quatern_d"):
            patches[name] = draw(quaternions)
    if draw(st.booleans()):
        for name in ("qoffset_x", "qoffset_y", "qoffset_z"):
            patches[name] = draw(floats)
    if draw(st.booleans()):
        row = draw(st.sampled_from(["srow_x", "srow_y", "srow_z"]))
        patches[row] = tuple(draw(floats) for _ in range(4))
    if draw(st.integers(0, 3)) == 0:
        ndim = draw(st.sampled_from([-1, 0, 2, 3, 3, 3, 4, 5, 8]))
        patches["dim"] = (ndim, *[draw(sizes) for _ in range(7)])
    if draw(st.integers(0, 3)) == 0:
        patches["datatype"] = draw(st.sampled_from(DATATYPES))
    return patches


@contextmanager
def _alarm(seconds: int) -> Iterator[None]:
    def _hang(signum: int, frame: object) -> None:
        raise TimeoutError(f"reading took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _itk_geometry(path: Path) -> tuple[tuple[int, ...], np.ndarray] | None:
    """Shape and RAS affine as SimpleITK reads the file, or None when it refuses it."""
    try:
        with captured_native_stderr():
            image = sitk.ReadImage(str(path))
    except RuntimeError:
        return None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        return None
    return tuple(image.GetSize()), itk_affine(image.GetOrigin(), image.GetSpacing(), image.GetDirection())


_PRISTINE: dict[str, bytes] = {}


def _pristine(folder: Path, suffix: str) -> bytes:
    """Bytes of the valid fixture file (made once per process)."""
    if suffix not in _PRISTINE:
        _PRISTINE[suffix] = write_nifti(folder / f"pristine{suffix}", image_array()).read_bytes()
    return _PRISTINE[suffix]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(patches=header_patches(), suffix=st.sampled_from([".nii", ".nii.gz"]))
def test_header_fields_read_identically_or_refused(tmp_path: Path, patches: dict[str, Any], suffix: str) -> None:
    path = tmp_path / f"patched{suffix}"
    path.write_bytes(_pristine(tmp_path, suffix))
    patch_nifti_fields(path, patches)
    tracemalloc.start()
    try:
        with _alarm(HANG_S):
            volume = read_volume(path, LIMITS)
    except MedgnError as exc:
        message = exc.one_line()
        assert exc.code in (3, 5), message
        assert message.startswith(str(path)), message
        fields = {
            (
                "quatern"
                if k.startswith("quatern")
                else "qoffset"
                if k.startswith("qoffset")
                else "srow"
                if k.startswith("srow")
                else k
            )
            for k in patches
        }
        words = {w for f in fields for w in FIELD_WORDS[f]}
        assert any(w in message.lower() for w in words), (patches, message)
        return
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < PEAK_BYTES, f"{peak} bytes allocated for {patches}"
    assert volume.array.dtype == np.float32 and np.isfinite(volume.array).all()
    assert np.isfinite(volume.affine).all() and abs(np.linalg.det(volume.affine[:3, :3])) > 0
    itk = _itk_geometry(path)
    if itk is not None:
        shape, affine = itk
        assert shape == volume.shape, (patches, shape, volume.shape)
        np.testing.assert_allclose(affine, volume.affine, atol=TOL, err_msg=str(patches))


def test_untouched_fixture_agrees_with_simpleitk(tmp_path: Path) -> None:
    """The comparison itself works: the unpatched file reads with the same geometry both ways."""
    path = write_nifti(tmp_path / "v.nii.gz", image_array())
    volume = read_volume(path)
    shape, affine = _itk_geometry(path)  # type: ignore[misc]
    assert shape == volume.shape
    np.testing.assert_allclose(affine, AFFINE, atol=TOL)
    np.testing.assert_allclose(volume.affine, AFFINE, atol=TOL)


def test_gzip_bomb_is_refused_with_small_memory_and_time(tmp_path: Path) -> None:
    """A .nii.gz whose stream inflates to 256 MiB for a 3 KB image: refused after the declared size."""
    import gzip
    import time

    path = write_nifti(tmp_path / "bomb.nii.gz", image_array())
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()) + bytes(256 << 20), 1))
    assert path.stat().st_size < 2 << 20  # zeros compress ~1000:1
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with _alarm(HANG_S), pytest.raises(MedgnError) as info:
            read_volume(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (
        info.value.code == 3
        and str(path) in str(info.value)
        and "beyond the size the header declares" in str(info.value)
    )
    assert peak < PEAK_BYTES, peak
    # Inflation stops at the declared 3 KB + 64 KiB: far below the ~1 s that 256 MiB would take.
    assert time.perf_counter() - start < 0.5
