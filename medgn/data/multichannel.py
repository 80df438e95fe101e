"""Multi-channel images stored as one 4D NIfTI per case (Medical Segmentation Decathlon).

MSD tasks such as BrainTumour (4 MRI sequences) or Prostate (T2, ADC) keep every channel of a case
in one file whose 4th axis is the channel, in the order of ``dataset.json``'s ``modality``. This
module owns reading such a file as C 3D :class:`~medgn.data.io.Volume` objects that share the file's
3D grid (so geometry checks, the pipeline and written masks use the 3D geometry), and
:func:`read_case_images`, the one rule every command uses to turn a case's image files into
channels: one file per channel, or a single 4D file when more than one channel is expected. A 4D
file where one channel is expected (plain folders, nnU-Net layouts, single-channel models) stays
refused by the header preflight ("expected 3D"). numpy and nibabel only: evaluation uses it too.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medgn.errors import InputDataError, brief

if TYPE_CHECKING:  # io and preflight import this module lazily; no import cycle at run time
    from medgn.data.io import Volume
    from medgn.data.preflight import Limits

__all__ = ["file_channel_count", "read_case_images", "read_channels"]


def file_channel_count(path: str | os.PathLike[str]) -> int:
    """Volumes on the 4th axis of a NIfTI header (1 for 3D files and other formats)."""
    from medgn.data.header import detect_format
    from medgn.data.nifti_header import open_nifti

    path = Path(path)
    if detect_format(path) != "nifti":
        return 1
    header, _ = open_nifti(path)
    dims = [int(d) for d in header["dim"]]
    return dims[4] if 4 <= dims[0] <= 7 and dims[4] > 1 else 1


def read_channels(path: str | os.PathLike[str], channels: int, limits: Limits | None = None) -> list[Volume]:
    """Read a 4D NIfTI (X, Y, Z, C) as ``channels`` float32 volumes on its 3D grid.

    Args:
        path: the 4D file.
        channels: the channel count the dataset or model expects; the file must hold exactly that.
        limits: header size limits (default :data:`~medgn.data.preflight.DEFAULT_LIMITS`), applied
            to all channels together.

    Returns:
        One :class:`~medgn.data.io.Volume` per channel, in file order, each with the file's 3D
        affine and header (a mask written with it is 3D).

    Raises:
        InputDataError: wrong channel count, bad header, unreadable data or NaN/Inf voxels (exit 3).
        ResourceError: above a size limit (exit 5).
    """
    import nibabel as nib

    from medgn.data.io import Volume
    from medgn.data.preflight import DEFAULT_LIMITS, read_header

    info = read_header(path, limits or DEFAULT_LIMITS, channels=channels)
    try:
        array = np.asanyarray(nib.load(str(info.path)).dataobj)
    except (EOFError, zlib.error, OSError, ValueError) as exc:
        raise InputDataError(
            info.path, "cannot read the voxel data (truncated or corrupt file?)", got=brief(exc)
        ) from None
    array = array.reshape((*info.shape, channels))
    volumes = []
    for c in range(channels):
        with np.errstate(over="ignore"):  # overflow becomes Inf, counted below
            channel = np.ascontiguousarray(array[..., c], dtype=np.float32)
        bad = int(np.count_nonzero(~np.isfinite(channel)))
        if bad:
            raise InputDataError(
                info.path,
                f"image channel {c} has {bad} NaN/Inf voxels",
                got=f"shape {array.shape}",
                expected="finite intensities",
            )
        volumes.append(Volume(channel, info.affine, info.path, "nifti", {**info.meta, "channel": c}))
    return volumes


def read_case_images(
    images: Sequence[str | os.PathLike[str]], channels: int, limits: Limits | None = None
) -> list[Volume]:
    """A case's channels as 3D volumes: one file per channel, or one 4D file holding them all.

    Args:
        images: the case's image files, channel order.
        channels: how many channels the dataset (``modality``/``channel_names``) or model expects.
        limits: header size limits.

    Returns:
        ``channels`` volumes (the first is the geometry reference).

    Raises:
        InputDataError: the channel count differs (naming the file), or any read check fails.
    """
    from medgn.data.io import read_volume
    from medgn.data.preflight import DEFAULT_LIMITS

    limits = limits or DEFAULT_LIMITS
    if len(images) == 1 and channels > 1:
        return read_channels(images[0], channels, limits)
    if len(images) != channels:
        raise InputDataError(
            images[0],
            f"case has {len(images)} channel(s)",
            got=[Path(p).name for p in images],
            expected=f"{channels} channel(s)",
        )
    return [read_volume(p, limits) for p in images]


def read_display_volume(path: str | os.PathLike[str]) -> Volume:
    """The first channel of an image for drawing (a 4D NIfTI's channel 0, else the 3D image)."""
    from medgn.data.io import read_volume

    count = file_channel_count(path)
    return read_channels(path, count)[0] if count > 1 else read_volume(path)
