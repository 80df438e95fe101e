"""MONAI reading and normalisation pieces: the medgn ImageReader, a loading transform, plan normalisation.

This module owns :class:`MedgnReader` (a MONAI ``ImageReader`` that reads every format through
:func:`medgn.data.io.read_volume`, so the header preflight, NaN/Inf and label checks run on every
load; several channel files are stacked after checking they share one geometry), :class:`LoadCased`
(MONAI's ``LoadImage`` with that reader, which lets medgn's errors through instead of trying other
readers) and :class:`NormalizePland` (the plan's per-channel normalisation, :func:`medgn.data.prepare.normalize`).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ImageReader
from monai.transforms import LoadImage, MapTransform

from medgn.data.io import Volume, geometry_diff, read_volume
from medgn.data.multichannel import read_channels
from medgn.data.preflight import DEFAULT_LIMITS, Limits, detect_format
from medgn.data.prepare import normalize
from medgn.errors import InputDataError


class MedgnReader(ImageReader):
    """MONAI ImageReader for NIfTI (nibabel), NRRD/MHA/DICOM (SimpleITK), through medgn's checks.

    Args:
        limits: header size limits.
        label: read integer labels (checked against ``label_values``).
        label_values: allowed label values, or None.
        channels: channels the plan expects; a single file is then read as a 4D MSD image.
    """

    def __init__(
        self,
        limits: Limits = DEFAULT_LIMITS,
        label: bool = False,
        label_values: Sequence[int] | None = None,
        channels: int = 1,
    ) -> None:
        super().__init__()
        self.limits, self.label, self.channels = limits, label, channels
        self.label_values = list(label_values) if label_values is not None else None

    def verify_suffix(self, filename: Sequence[os.PathLike[str] | str] | os.PathLike[str] | str) -> bool:
        names = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
        try:
            return all(detect_format(Path(n)) for n in names)
        except InputDataError:
            return False

    def read(self, data: Sequence[os.PathLike[str] | str] | os.PathLike[str] | str, **kwargs: Any) -> list[Volume]:
        names = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        if len(names) == 1 and self.channels > 1 and not self.label:  # one 4D MSD file: C channels
            return read_channels(names[0], self.channels, self.limits)
        vols = [read_volume(n, self.limits, label=self.label, label_values=self.label_values) for n in names]
        for vol in vols[1:]:
            diffs = geometry_diff(vols[0], vol)
            if diffs:
                raise InputDataError(vol.path, f"channel geometry differs from {vols[0].path}: {'; '.join(diffs)}")
        return vols

    def get_data(self, img: list[Volume]) -> tuple[np.ndarray, dict[str, Any]]:
        first = img[0]
        array = np.stack([v.array for v in img], axis=0)  # (C, X, Y, Z)
        meta = {
            "affine": first.affine.copy(),
            "original_affine": first.affine.copy(),
            "spatial_shape": np.asarray(first.shape),
            "original_channel_dim": 0,
            "space": "RAS",
            "format": first.format,
        }
        return array, meta


class LoadCased(MapTransform):
    """Load ``d[key]`` (a path or a list of channel paths) as a channel-first MetaTensor.

    MONAI's ``LoadImaged`` would swallow a reader's error and try its other readers; calling
    ``LoadImage`` with the reader given at call time lets medgn's one-line errors through.
    """

    def __init__(self, keys: str | Sequence[str], reader: MedgnReader, dtype: Any = np.float32) -> None:
        super().__init__(keys)
        self.reader = reader
        self.loader = LoadImage(image_only=True, dtype=dtype)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key], reader=self.reader)
        return d


class NormalizePland(MapTransform):
    """Apply the plan's per-channel normalisation to channel-first images."""

    def __init__(self, keys: str | Sequence[str], normalization: Sequence[Mapping[str, Any]]) -> None:
        super().__init__(keys)
        self.normalization = list(normalization)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            out = normalize(img, self.normalization, name=str(key))
            d[key] = img.clone().copy_(out) if hasattr(img, "meta") and img.dtype == out.dtype else out
        return d
