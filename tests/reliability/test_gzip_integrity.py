"""gzip integrity in the header preflight: CRC32, ISIZE, trailing data and concatenated members.

Every fixture starts from a valid ``.nii.gz`` whose gzip bytes are then changed: a flipped CRC32 or
ISIZE in the trailer, a flipped byte inside the deflate data, garbage after the stream, a second
member that adds voxels, the stream split into two members (valid), zero padding (valid). Each
refused file is refused by ``read_volume`` with code 3 naming the file, and by ``medgn verify``.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from medgn.data.gzipcheck import SLACK_BYTES, check_gzip
from medgn.data.io import read_volume
from medgn.errors import MedgnError
from tests.reliability.conftest import assert_clean_failure, cli, image_array, make_msd, write_nifti


def _flip_trailer(data: bytes, offset: int) -> bytes:
    """Add 1 (mod 2**32) to the little-endian word at ``offset`` from the end (-8 CRC32, -4 ISIZE)."""
    value = (struct.unpack("<I", data[offset : offset + 4 or None])[0] + 1) % 2**32
    return data[:offset] + struct.pack("<I", value) + (data[offset + 4 :] if offset + 4 else b"")


def _flip_middle(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]


def _members(raw: bytes) -> bytes:
    return gzip.compress(raw[:500], mtime=0) + gzip.compress(raw[500:], mtime=0)


# name -> (change of the .nii.gz bytes given (gz bytes, raw bytes), words of the error)
BROKEN: dict[str, tuple[Callable[[bytes, bytes], bytes], str]] = {
    "crc": (lambda gz, raw: _flip_trailer(gz, -8), "incorrect data check"),
    "isize": (lambda gz, raw: _flip_trailer(gz, -4), "incorrect length check"),
    "deflate_byte": (lambda gz, raw: _flip_middle(gz), "corrupt"),
    "trailing_garbage": (lambda gz, raw: gz + b"GARBAGE!", "trailing bytes"),
    "appended_member": (
        lambda gz, raw: gz + gzip.compress(bytes(SLACK_BYTES + 1), mtime=0),
        "beyond the size the header declares",
    ),
    "short_members": (
        lambda gz, raw: gzip.compress(raw[:500], mtime=0) + gzip.compress(raw[500:-100], mtime=0),
        "truncated",
    ),
}
VALID: dict[str, Callable[[bytes, bytes], bytes]] = {
    "two_members": lambda gz, raw: _members(raw),
    "zero_padding": lambda gz, raw: gz + bytes(512),
    "small_appended_member": lambda gz, raw: gz + gzip.compress(bytes(16), mtime=0),
}


def _fixture(folder: Path, name: str, change: Callable[[bytes, bytes], bytes]) -> Path:
    path = write_nifti(folder / f"{name}.nii.gz", image_array())
    gz = path.read_bytes()
    path.write_bytes(change(gz, gzip.decompress(gz)))
    return path


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_corrupt_gzip_is_refused(tmp_path: Path, name: str) -> None:
    change, words = BROKEN[name]
    path = _fixture(tmp_path, name, change)
    with pytest.raises(MedgnError) as info:
        read_volume(path)
    assert info.value.code == 3, info.value
    assert str(path) in str(info.value) and words in str(info.value), info.value


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_gzip_variants_are_read(tmp_path: Path, name: str) -> None:
    path = _fixture(tmp_path, name, VALID[name])
    np.testing.assert_array_equal(read_volume(path).array, image_array())


def test_check_gzip_reports_the_inflated_size(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(bytes(1000)))
    assert check_gzip(path, 1000, "1000 bytes") == 1000
    with pytest.raises(MedgnError, match="beyond"):
        check_gzip(path, 10, "10 bytes", slack=0)
    with pytest.raises(MedgnError, match="truncated"):
        check_gzip(path, 1001, "1001 bytes")


def test_verify_refuses_a_corrupted_nii_gz(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's case: a CRC-corrupted image used to pass ``medgn verify``."""
    root = make_msd(tmp_path / "ds", 2)
    image = root / "imagesTr" / "c1.nii.gz"
    image.write_bytes(_flip_trailer(image.read_bytes(), -8))
    result = cli(["verify", root], capsys)
    assert_clean_failure(result, 3, [root], ["1 problem(s) in 1 of 2 cases"])
    problem = next(line for line in result.err.splitlines() if line.startswith("problem: "))
    assert str(image) in problem and "incorrect data check" in problem, problem
