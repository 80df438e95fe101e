"""MONAI transform pipelines for training and validation, and their data loaders.

This module owns :func:`train_transforms`, :func:`val_transforms`, :func:`infer_transforms` (dict
transforms; keys "image" = list of channel paths, "label" = path), :func:`pipeline_hash` (the cache
key: a changed plan or pipeline never reads a stale cache) and :func:`make_val_data`. The plan
arrives as any object with the :class:`Preprocessing` attributes (the data layer sits below
planning, so it names the fields it reads, not the Plan class). The deterministic part (load, crop
to the nonzero region, normalise, orient to RAS, resample to the target spacing, map label values to
class indices) is cacheable; random crops with foreground oversampling and augmentation follow.
``medgn infer`` computes the same deterministic part without MONAI (:mod:`medgn.data.prepare`,
held to :func:`infer_transforms` by the tests) and inverts it there.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from monai.transforms import Compose, MapTransform

from medgn.data.augment import ForegroundIndicesd, RandPatchAffined
from medgn.data.config import DataConfig
from medgn.data.datasets import Case
from medgn.data.preflight import DEFAULT_LIMITS, Limits
from medgn.data.prepare import PIPELINE_VERSION
from medgn.data.reader import LoadCased, MedgnReader, NormalizePland
from medgn.data.workload import check_workload
from medgn.errors import MedgnError
from medgn.files import json_sha256, make_output_dir


class Preprocessing(Protocol):
    """What the pipelines read from a plan (:class:`medgn.planning.plan.Plan` has these)."""

    label_values: Sequence[int]
    normalization: Sequence[Mapping[str, Any]]
    target_spacing: Sequence[float]
    patch_size: Sequence[int]


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    """Foreground for the crop: nonzero voxels; a blank image keeps its whole grid.

    Cropping a blank image to its (empty) nonzero region would leave an empty array that no later
    transform can resample, so an image without a nonzero voxel is not cropped at all.
    """
    mask = x != 0
    return mask if bool(mask.any()) else torch.ones_like(mask)


class CheckWorkloadd(MapTransform):
    """Pipeline step before ``Spacingd``: the image's resampled size within the limits.

    A MONAI transform, so a persistent cache stores what follows the resampling, not the volume
    before it (the cache keeps no affine: resampling a cached volume would assume 1 mm voxels).

    Args:
        key: the image key (a channel-first MetaTensor already reoriented and cropped).
        target_spacing: the plan's spacing.
        limits: ``max_resampled_voxels``.

    Raises:
        RuntimeError: the image carries no affine (resampling it would be wrong; a medgn bug).
    """

    def __init__(self, key: str, target_spacing: Sequence[float], limits: Limits = DEFAULT_LIMITS) -> None:
        super().__init__([key])
        self.key, self.target_spacing, self.limits = key, [float(s) for s in target_spacing], limits

    def __call__(self, data: Mapping[Hashable, Any]) -> Mapping[Hashable, Any]:
        image = data[self.key]
        affine = getattr(image, "affine", None)
        if affine is None:
            raise RuntimeError(f"{self.key}: no affine before resampling (got {type(image).__name__})")
        meta = getattr(image, "meta", None) or {}
        path = meta.get("filename_or_obj", self.key)
        check_workload(
            path, tuple(image.shape[1:]), np.asarray(affine, dtype=np.float64), self.target_spacing, self.limits
        )
        return data


class MedgnCompose(Compose):
    """A MONAI Compose that lets medgn's user errors out unwrapped (MONAI wraps them in RuntimeError)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except RuntimeError as exc:
            cause: BaseException | None = exc
            while cause is not None and not isinstance(cause, MedgnError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise cause from None


def _compose(steps: list[Any]) -> MedgnCompose:
    return MedgnCompose(steps)


def _deterministic(plan: Preprocessing, limits: Limits, with_label: bool) -> list[Any]:
    from monai.transforms import CropForegroundd, MapLabelValued, Orientationd, Spacingd

    keys = ["image", "label"] if with_label else ["image"]
    steps: list[Any] = [LoadCased("image", MedgnReader(limits, channels=int(getattr(plan, "in_channels", 1))))]
    if with_label:
        values = [int(v) for v in plan.label_values]
        steps += [
            LoadCased("label", MedgnReader(limits, label=True, label_values=values), dtype=np.float32),
            MapLabelValued("label", orig_labels=values, target_labels=list(range(len(values)))),
        ]
    steps += [
        CropForegroundd(keys, source_key="image", select_fn=_nonzero, allow_smaller=True),
        NormalizePland("image", [dict(n) for n in plan.normalization]),
        Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),  # explicit: RAS world labels
        CheckWorkloadd("image", plan.target_spacing, limits),  # before resampling: refuse what would explode
        Spacingd(keys, pixdim=[float(s) for s in plan.target_spacing], mode=("bilinear", "nearest")[: len(keys)]),
    ]
    return steps


def _augment(plan: Preprocessing, cfg: DataConfig) -> list[Any]:
    from monai.transforms import (
        RandAdjustContrastd,
        RandFlipd,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandScaleIntensityd,
        RandShiftIntensityd,
        SpatialPadd,
    )

    keys = ["image", "label"]
    patch = [int(p) for p in plan.patch_size]
    # Rotations and zooms resample the patch's neighbourhood in the case (no made-up corners); the
    # foreground list is cached with the case, so drawing a crop centre does not scan the volume.
    crop = RandPatchAffined(
        keys,
        label_key="label",
        patch_size=patch,
        pos=cfg.foreground_ratio,
        num_samples=cfg.samples_per_volume,
        prob_rotate=cfg.prob_rotate,
        rotate_rad=math.radians(cfg.rotate_deg),
        prob_scale=cfg.prob_scale,
        zoom_range=cfg.scale_range,
    )
    return [
        SpatialPadd(keys, spatial_size=patch),
        ForegroundIndicesd("label"),
        crop,
        *[RandFlipd(keys, prob=cfg.prob_flip, spatial_axis=a) for a in range(3)],
        RandScaleIntensityd("image", factors=cfg.intensity_scale, prob=cfg.prob_intensity_scale),
        RandShiftIntensityd("image", offsets=cfg.intensity_shift, prob=cfg.prob_intensity_shift),
        RandAdjustContrastd("image", gamma=cfg.gamma_range, prob=cfg.prob_gamma),
        RandGaussianNoised("image", std=cfg.noise_std, prob=cfg.prob_noise),
        RandGaussianSmoothd(
            "image", sigma_x=cfg.blur_sigma, sigma_y=cfg.blur_sigma, sigma_z=cfg.blur_sigma, prob=cfg.prob_blur
        ),
    ]


def _finish(with_label: bool) -> list[Any]:
    from monai.transforms import CastToTyped, EnsureTyped

    steps: list[Any] = [EnsureTyped("image", dtype=torch.float32)]
    if with_label:
        steps.append(CastToTyped("label", dtype=torch.int64))  # exact: nearest interpolation keeps integers
    return steps


def train_transforms(plan: Preprocessing, cfg: DataConfig) -> Any:
    """Training Compose: deterministic preprocessing, then random patches and augmentation.

    Output per sample: "image" (C, *patch) float32, "label" (1, *patch) int64 class indices.
    """
    return _compose([*_deterministic(plan, cfg.limits, True), *_augment(plan, cfg), *_finish(True)])


def val_transforms(plan: Preprocessing, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Validation Compose: whole preprocessed volumes with labels, no randomness."""
    return _compose([*_deterministic(plan, limits, True), *_finish(True)])


def infer_transforms(plan: Preprocessing, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Inference Compose: "image" only, the deterministic part without labels.

    ``medgn infer`` computes the same with :func:`medgn.data.prepare.prepare` (no MONAI import);
    this Compose is the reference the tests hold it to, and its output dict inverts with
    :func:`medgn.data.prepare.invert_to_input` too.
    """
    return _compose([*_deterministic(plan, limits, False), *_finish(False)])


def pipeline_hash(plan: Preprocessing, limits: Limits = DEFAULT_LIMITS) -> str:
    """Hash of everything that changes the cached (deterministic) preprocessing."""
    key = {
        "pipeline_version": PIPELINE_VERSION,
        "target_spacing": [float(s) for s in plan.target_spacing],
        "normalization": [dict(n) for n in plan.normalization],
        "label_values": [int(v) for v in plan.label_values],
        "limits": [limits.max_voxels, limits.max_bytes, limits.max_dim],
    }
    return json_sha256(key, compact=False)[:16]


def case_item(case: Case) -> dict[str, Any]:
    """The dict a pipeline reads for one case; "stamp" (sizes and mtimes) keys the cache per file."""
    paths = [*case.images, *((case.label,) if case.label else ())]
    stamp = ";".join(f"{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in map(Path, paths) if p.exists())
    item: dict[str, Any] = {"image": [str(p) for p in case.images], "case_id": case.case_id, "stamp": stamp}
    if case.label is not None:
        item["label"] = str(case.label)
    return item


def cached_dataset(items: list[dict[str, Any]], transform: Any, plan: Preprocessing, cfg: DataConfig, kind: str) -> Any:
    """A MONAI dataset caching ``transform``'s deterministic output as ``cfg`` says.

    On disk under ``cfg.cache_dir/prep-<pipeline hash>-<kind>`` (a changed plan never reads a
    stale cache; "train" and "val" keep apart, since MONAI names a cached case by its files alone and
    the training prefix pads the case and lists its foreground), else in memory for
    ``cfg.cache_rate`` of the cases, else no cache.
    """
    from monai.data import CacheDataset, Dataset, PersistentDataset

    if cfg.cache_dir is not None:
        folder = Path(cfg.cache_dir) / f"prep-{pipeline_hash(plan, cfg.limits)}-{kind}"
        make_output_dir(folder, "data.cache_dir")
        return PersistentDataset(items, transform=transform, cache_dir=folder)
    if cfg.cache_rate > 0:
        # One worker for the cache build: several threads of MONAI transforms fight over 2 cores.
        return CacheDataset(items, transform=transform, cache_rate=cfg.cache_rate, num_workers=1, progress=False)
    return Dataset(items, transform=transform)


def make_val_data(cases: Sequence[Case], plan: Preprocessing, cfg: DataConfig) -> Any:
    """A dataset of whole preprocessed validation volumes (cached like the training data)."""
    return cached_dataset([case_item(c) for c in cases], val_transforms(plan, cfg.limits), plan, cfg, "val")
