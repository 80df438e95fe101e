"""Random training patches rotated and zoomed from their neighbourhood, not from the patch alone.

This module owns :class:`RandPatchAffined`: the foreground-oversampled crop of
``RandCropByPosNegLabeld`` and a random rotation and zoom in one resampling, and
:class:`ForegroundIndicesd`, the cached list of foreground voxels the crop centres come from, and
:func:`plain_tensor`, which training and validation use to unwrap a pipeline's MetaTensors.
Rotating or zooming a patch after it was cut out (``RandRotated``/``RandZoomd`` behind the crop)
fills it with voxels that are not in the scan: rotations of up to 15 degrees about each axis leave
14 % of a 64x64x32 patch zeros on average (24 % at 15 degrees about all three), and a zoom of 0.85
repeats its edge voxels over 40 % of it. Here the rotated, zoomed box of patch size is sampled from
the case around the crop's centre, so only what lies outside the scan itself is zeros (like the
padding to at least one patch). Patches that are neither rotated nor zoomed are plain crops.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import MapTransform, Randomizable

# Key of the cached foreground voxel list (flat int32 indices into the padded label's grid).
FOREGROUND_KEY = "label_foreground"
# Background draws tried before falling back to listing every background voxel (a label that is
# mostly foreground).
_BACKGROUND_TRIES = 64


def plain_tensor(x: Any) -> torch.Tensor:
    """A pipeline value (MONAI MetaTensor, array or tensor) as a plain torch tensor."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def foreground_indices(label: torch.Tensor) -> torch.Tensor:
    """Flat indices (int32 where they fit) of the voxels where any channel of ``label`` is > 0."""
    flat = (plain_tensor(label) > 0).any(dim=0).reshape(-1)
    index = torch.nonzero(flat).flatten()
    return index.to(torch.int32) if flat.numel() < 2**31 else index


class ForegroundIndicesd(MapTransform):
    """Deterministic step before the random crops: lists the label's foreground voxels once.

    Cached with the preprocessed case, so a training sample does not search the whole volume for
    its crop centre (``RandCropByPosNegLabeld`` lists foreground and background on every call).
    """

    def __init__(self, label_key: str = "label", out_key: str = FOREGROUND_KEY) -> None:
        super().__init__([label_key])
        self.label_key, self.out_key = label_key, out_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        out[self.out_key] = foreground_indices(data[self.label_key])
        return out


def rotation_matrix(angles: Sequence[float]) -> np.ndarray:
    """Rotation of array-index space: about axis 0, then 1, then 2 (radians), as a 3x3 matrix."""
    a, b, c = (float(t) for t in angles)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


def sample_box(
    volume: torch.Tensor, centre: np.ndarray, matrix: np.ndarray, size: Sequence[int], mode: str
) -> torch.Tensor:
    """Resample ``volume`` (C, D, H, W) on a box of ``size`` voxels centred on ``centre``.

    Output voxel ``o`` takes the value at ``centre + matrix @ (o - (size - 1) / 2)`` in the
    volume's voxel coordinates ("bilinear" or "nearest"); zeros outside the volume. Only the
    neighbourhood the box can reach is read.
    """
    half = (np.asarray(size, dtype=np.float64) - 1.0) / 2.0
    reach = np.abs(matrix) @ half
    lo = np.floor(centre - reach).astype(int) - 1
    hi = np.ceil(centre + reach).astype(int) + 2
    shape = np.asarray(volume.shape[1:])
    lo, hi = np.clip(lo, 0, shape - 1), np.clip(hi, 1, shape)  # grid_sample reads zeros beyond the volume
    if (hi - lo < 2).any():  # a one-voxel axis: pad it with zeros so that it has two grid points
        lo, hi = lo - (hi - lo < 2), hi
    region = volume[:, max(lo[0], 0) : hi[0], max(lo[1], 0) : hi[1], max(lo[2], 0) : hi[2]].float()
    if (lo < 0).any():
        region = F.pad(region, [int(x) for axis in (2, 1, 0) for x in (-min(lo[axis], 0), 0)])
    # grid_sample's coordinates: (x = W, y = H, z = D) in [-1, 1] over the region (align_corners).
    scale = 2.0 / (hi - lo - 1.0)
    step = (matrix * scale[:, None])[::-1]  # row r: how axis r's normalised coordinate moves per output step
    first = (centre - lo - matrix @ half) * scale - 1.0
    grid = torch.from_numpy(np.ascontiguousarray(first[::-1])).float().expand(*size, 3)
    for axis, n in enumerate(size):
        column = torch.from_numpy(np.ascontiguousarray(step[:, axis])).float()
        ramp = torch.arange(n, dtype=torch.float32).view(*[n if a == axis else 1 for a in range(3)], 1)
        grid = grid + ramp * column
    out = F.grid_sample(region[None], grid[None], mode=mode, padding_mode="zeros", align_corners=True)
    return out[0].to(volume.dtype)


class RandPatchAffined(Randomizable, MapTransform):
    """Foreground-oversampled random patches, each rotated and zoomed with some probability.

    Args:
        keys: the volumes to cut (channel-first, at least ``patch_size`` after padding).
        label_key: the label volume: crop centres come from its foreground (> 0) or background, and it
            is resampled with nearest neighbours (every other key bilinearly).
        patch_size: the output box.
        pos: fraction of patches centred on a foreground voxel.
        num_samples: patches per call (a list of that many dicts, like ``RandCropByPosNegLabeld``).
        prob_rotate: probability of a rotation; angles uniform in +/- ``rotate_rad`` about each axis.
        rotate_rad: largest angle, radians.
        prob_scale: probability of a zoom (one factor for all axes, uniform in ``zoom_range``; below
            1 the patch shows more of the scan, smaller).
        zoom_range: (low, high) zoom factors.
    """

    def __init__(
        self,
        keys: Sequence[str],
        label_key: str,
        patch_size: Sequence[int],
        pos: float,
        num_samples: int = 1,
        prob_rotate: float = 0.0,
        rotate_rad: float = 0.0,
        prob_scale: float = 0.0,
        zoom_range: tuple[float, float] = (1.0, 1.0),
    ) -> None:
        MapTransform.__init__(self, keys)
        if len(patch_size) != 3:
            raise ValueError(f"RandPatchAffined: a 3-D patch size is needed, got {list(patch_size)}")
        if not 0 < zoom_range[0] <= zoom_range[1]:
            raise ValueError(f"RandPatchAffined: zoom range must be 0 < low <= high, got {list(zoom_range)}")
        self.label_key, self.patch = label_key, [int(p) for p in patch_size]
        self.pos, self.num_samples = float(pos), int(num_samples)
        self.prob_rotate, self.rotate_rad = float(prob_rotate), float(rotate_rad)
        self.prob_scale, self.zoom_range = float(prob_scale), (float(zoom_range[0]), float(zoom_range[1]))

    def randomize(self, data: Any = None) -> None:  # the draws happen per call in __call__
        pass

    def _draw_matrix(self) -> np.ndarray | None:
        """One patch's transform from output offsets to scan offsets; None: a plain crop."""
        rotate = self.R.random_sample() < self.prob_rotate
        angles = self.R.uniform(-self.rotate_rad, self.rotate_rad, size=3)
        zoom_on = self.R.random_sample() < self.prob_scale
        zoom = self.R.uniform(*self.zoom_range)
        if not rotate and not zoom_on:
            return None
        matrix = rotation_matrix(angles) if rotate else np.eye(3)
        return matrix / (zoom if zoom_on else 1.0)

    def _centres(self, data: Mapping[Hashable, Any], label: torch.Tensor) -> list[np.ndarray]:
        """Crop centres: foreground voxels with probability ``pos``, else background voxels.

        Each is uniform over its set (like ``RandCropByPosNegLabeld``), then moved as little as needed
        for the patch to fit. Background voxels are drawn by rejection from the whole grid.
        """
        shape = np.asarray(label.shape[1:])
        fg = data.get(FOREGROUND_KEY)
        fg = foreground_indices(label) if fg is None else plain_tensor(fg)
        total = int(np.prod(shape))
        centres = []
        for _ in range(self.num_samples):
            want_fg = self.R.random_sample() < self.pos
            index = None
            if (want_fg or len(fg) == total) and len(fg) > 0:
                index = int(fg[self.R.randint(len(fg))])
            else:
                for _ in range(_BACKGROUND_TRIES):
                    candidate = int(self.R.randint(total))
                    if not bool((label[(slice(None), *np.unravel_index(candidate, tuple(shape)))] > 0).any()):
                        index = candidate
                        break
                if index is None:  # almost all foreground: list the background
                    background = torch.nonzero(~(label > 0).any(dim=0).reshape(-1)).flatten()
                    index = int(background[self.R.randint(len(background))])
            centre = np.asarray(np.unravel_index(index, tuple(shape)))
            patch = np.asarray(self.patch)
            start = np.clip(centre - patch // 2, 0, shape - patch)
            centres.append(start + patch // 2)
        return centres

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        label = plain_tensor(data[self.label_key])
        shape = tuple(label.shape[1:])
        if any(s < p for s, p in zip(shape, self.patch, strict=True)):
            raise ValueError(f"RandPatchAffined: volume {list(shape)} is smaller than the patch {self.patch}")
        centres = self._centres(data, label)
        out = []
        patch = np.asarray(self.patch)
        for centre in centres:
            start = centre - patch // 2
            mid = start + (patch - 1.0) / 2.0
            matrix = self._draw_matrix()
            sample = {k: v for k, v in data.items() if k != FOREGROUND_KEY}
            for key in self.key_iterator(sample):
                volume = plain_tensor(sample[key])
                if matrix is None:
                    sl = tuple(slice(int(s), int(s) + p) for s, p in zip(start, self.patch, strict=True))
                    sample[key] = volume[(slice(None), *sl)].clone()
                else:
                    mode = "nearest" if key == self.label_key else "bilinear"
                    sample[key] = sample_box(volume, mid, matrix, self.patch, mode)
            out.append(sample)
        return out
