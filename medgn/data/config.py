"""Configuration of the data pipeline: limits, caching, workers, sampling and augmentation.

This module owns the frozen :class:`DataConfig`, validated by :func:`medgn.configtools.build`
(ranges in field metadata). Defaults follow nnU-Net's augmentation probabilities; every field is
part of the cache key of the preprocessed data only when it changes what is cached.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from medgn.data.preflight import Limits


@dataclass(frozen=True)
class DataConfig:
    """Data loading and augmentation settings.

    Attributes:
        limits: header size limits for every read.
        cache_dir: folder for the persistent preprocessed cache; None keeps the cache in memory.
        cache_rate: fraction of cases cached in memory when ``cache_dir`` is None (0 = no cache).
        num_workers: data loader worker processes.
        foreground_ratio: fraction of random crops centred on a foreground voxel.
        samples_per_volume: not used by ``medgn train``, whose sampler draws one crop per sample
            and decides how many samples each case gives (kept so that earlier configs load; a
            resume may change it). :func:`medgn.data.pipeline.train_transforms` alone reads it.
        prob_flip: probability of a flip, per axis.
        prob_rotate: probability of a random rotation of a patch (resampled from its neighbourhood in
            the case, :class:`medgn.data.augment.RandPatchAffined`).
        rotate_deg: largest rotation angle per axis, degrees.
        prob_scale: probability of a random zoom of a patch (likewise).
        scale_range: zoom factor range (below 1 a patch shows more of the case).
        prob_intensity_scale: probability of multiplying intensities by a random factor.
        intensity_scale: factor range is 1 +/- this.
        prob_intensity_shift: probability of adding a random offset.
        intensity_shift: offset range is +/- this (in normalised units).
        prob_gamma: probability of a random gamma (contrast) change.
        gamma_range: gamma range.
        prob_noise: probability of Gaussian noise.
        noise_std: noise standard deviation (normalised units).
        prob_blur: probability of Gaussian blur.
        blur_sigma: blur sigma range, voxels.
    """

    limits: Limits = field(default_factory=Limits)
    cache_dir: str | None = None
    # 0..1 fraction of cases.
    cache_rate: float = field(default=1.0, metadata={"min": 0.0, "max": 1.0})
    # 0..64 workers: more than 64 only thrashes a node's memory bandwidth.
    num_workers: int = field(default=2, metadata={"min": 0, "max": 64})
    # nnU-Net samples a third of its patches around foreground.
    foreground_ratio: float = field(default=0.33, metadata={"min": 0.0, "max": 1.0})
    # 1..64 crops per call of train_transforms (not used by medgn train: see above).
    samples_per_volume: int = field(default=2, metadata={"min": 1, "max": 64})
    # Augmentation probabilities and ranges from nnU-Net's default data augmentation.
    prob_flip: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})
    prob_rotate: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0})
    rotate_deg: float = field(default=30.0, metadata={"min": 0.0, "max": 180.0})
    prob_scale: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0})
    scale_range: tuple[float, float] = field(default=(0.7, 1.4), metadata={"min": 0.1, "max": 10.0})
    prob_intensity_scale: float = field(default=0.15, metadata={"min": 0.0, "max": 1.0})
    intensity_scale: float = field(default=0.25, metadata={"min": 0.0, "max": 1.0})
    prob_intensity_shift: float = field(default=0.15, metadata={"min": 0.0, "max": 1.0})
    intensity_shift: float = field(default=0.1, metadata={"min": 0.0, "max": 10.0})
    prob_gamma: float = field(default=0.3, metadata={"min": 0.0, "max": 1.0})
    gamma_range: tuple[float, float] = field(default=(0.7, 1.5), metadata={"min": 0.01, "max": 10.0})
    prob_noise: float = field(default=0.1, metadata={"min": 0.0, "max": 1.0})
    noise_std: float = field(default=0.1, metadata={"min": 0.0, "max": 10.0})
    prob_blur: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0})
    blur_sigma: tuple[float, float] = field(default=(0.5, 1.0), metadata={"min": 0.0, "max": 10.0})

    def __post_init__(self) -> None:
        for name in ("scale_range", "gamma_range", "blur_sigma"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {[lo, hi]}")
