"""gzip integrity of a compressed image: every member inflated to its end, with bounded cost.

This module owns :func:`check_gzip`, the preflight's check of a ``.nii.gz``. The stream is inflated
in bounded chunks to its very end, so zlib verifies every member's trailer (CRC32 and ISIZE): a
corrupted byte anywhere in the file is refused, not only a truncated tail. The uncompressed total
must be at least the size the header declares (else the file is truncated) and at most that size
plus :data:`SLACK_BYTES`: inflation stops there, so a compression bomb costs no more memory or time
than the image it claims to be. Bytes after the last member must be zero padding (which gzip
allows); anything else is trailing garbage and refused.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

from medgn.errors import InputDataError

__all__ = ["SLACK_BYTES", "check_gzip", "check_zlib"]

# Uncompressed bytes accepted beyond the declared image: room for writers that append a few
# bytes after the voxel data, far too little to hide a compression bomb.
SLACK_BYTES = 64 * 1024
# Compressed bytes read and uncompressed bytes produced per step: 1 MiB keeps memory flat.
_CHUNK = 1 << 20
_GZIP_WBITS = 31  # 16 + 15: gzip wrapper, 32 KiB window; zlib checks CRC32 and ISIZE per member


def _corrupt(path: Path, total: int, needed: int, what: str, reason: str) -> InputDataError:
    return InputDataError(
        path,
        f"file is corrupt ({reason})",
        got=f"gzip stream fails after {total} uncompressed bytes",
        expected=f"{needed} bytes for {what} with valid CRC32 and length",
    )


def check_gzip(path: str | os.PathLike[str], needed: int, what: str, slack: int = SLACK_BYTES) -> int:
    """Inflate every gzip member of ``path`` to its end and check size, CRC32 and trailer.

    Args:
        path: the ``.gz`` file.
        needed: uncompressed bytes the header declares (offset + voxel data).
        what: the declared image, for the message (e.g. ``"shape (10, 9, 8) float32"``).
        slack: uncompressed bytes accepted beyond ``needed``.

    Returns:
        The total uncompressed size.

    Raises:
        InputDataError: not gzip, a member's CRC32 or length differs, the stream ends early
            (truncated), inflates beyond ``needed + slack`` (compression bomb or concatenated
            members that change the size) or is followed by bytes that are not zero padding.
    """
    path = Path(path)
    limit = needed + slack
    total, inflater = 0, zlib.decompressobj(wbits=_GZIP_WBITS)
    started = False  # a member began (its header was consumed)
    with open(path, "rb") as handle:
        pending = b""
        while True:
            if not pending:
                pending = handle.read(_CHUNK)
                if not pending:
                    break
            if inflater.eof:
                if not pending.strip(b"\0"):
                    pending = b""  # zero padding after the last member, as gzip allows
                    continue
                if pending[:2] != b"\x1f\x8b":
                    raise InputDataError(
                        path,
                        "file has trailing bytes after the gzip stream",
                        got=f"{total} uncompressed bytes, then data that is not gzip",
                        expected=f"{needed} bytes for {what} and nothing after",
                    )
                inflater = zlib.decompressobj(wbits=_GZIP_WBITS)  # another concatenated member
            try:
                # At most one chunk (or what is left under the limit + 1) of output per call.
                out = inflater.decompress(pending, max(1, min(_CHUNK, limit + 1 - total)))
            except zlib.error as exc:
                raise _corrupt(path, total, needed, what, str(exc)) from None
            started = True
            total += len(out)
            if total > limit:
                raise InputDataError(
                    path,
                    "gzip stream inflates beyond the size the header declares (compression bomb or appended data)",
                    got=f"more than {limit} uncompressed bytes",
                    expected=f"{needed} bytes for {what}",
                )
            pending = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
    if started and not inflater.eof:
        try:  # output zlib still holds (at most a window, 32 KiB) once the input has ended
            total += len(inflater.flush())
        except zlib.error as exc:
            raise _corrupt(path, total, needed, what, str(exc)) from None
    if not started or not inflater.eof:
        raise InputDataError(
            path,
            "file is truncated or corrupt",
            got=f"gzip stream ends after {total} uncompressed bytes",
            expected=f"{needed} bytes for {what}",
        )
    if total < needed:
        raise InputDataError(
            path,
            "file is truncated",
            got=f"{total} uncompressed bytes",
            expected=f"{needed} bytes for {what}",
        )
    return total


def check_zlib(path: str | os.PathLike[str], offset: int, needed: int, what: str) -> None:
    """Inflate the zlib (or gzip) stream at ``offset`` of ``path`` and check it holds ``needed`` bytes.

    For MetaImage ``CompressedData``: the stream must end properly (its Adler-32 checked) after
    exactly ``needed`` bytes; inflation stops one chunk past that, so a bomb costs nothing.

    Raises:
        InputDataError: the stream is corrupt, ends early or holds more than ``needed`` bytes.
    """
    path = Path(path)
    total, inflater = 0, zlib.decompressobj(wbits=47)  # 32 + 15: a zlib or gzip header, detected
    with open(path, "rb") as handle:
        handle.seek(offset)
        pending = b""
        while not inflater.eof:
            if not pending:
                pending = handle.read(_CHUNK)
                if not pending:
                    break
            try:
                out = inflater.decompress(pending, max(1, min(_CHUNK, needed + 1 - total)))
            except zlib.error as exc:
                raise InputDataError(
                    path,
                    f"compressed voxel data are corrupt ({exc})",
                    got=f"stream fails after {total} bytes",
                    expected=f"{needed} bytes for {what}",
                ) from None
            total += len(out)
            if total > needed:
                raise InputDataError(
                    path,
                    "compressed voxel data hold more than the header declares",
                    expected=f"{needed} bytes for {what}",
                )
            pending = inflater.unconsumed_tail
    if not inflater.eof or total != needed:
        raise InputDataError(
            path,
            "compressed voxel data are truncated or corrupt",
            got=f"{total} bytes{'' if inflater.eof else ', stream unfinished'}",
            expected=f"{needed} bytes for {what}",
        )
