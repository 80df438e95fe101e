"""Planning: target spacing, normalisation, patch size, network strides and batch size.

This module owns :func:`make_plan` (fingerprint -> :class:`~medgn.planning.plan.Plan`, the
contract with the trainer and inference), the normalisation choice :func:`plan_for_ct_or_mr` and
the stride/kernel rule :func:`strides_and_kernels`. Rules follow nnU-Net: median
spacing with an anisotropy exception, CT clipped to foreground percentiles and z-scored with dataset
statistics, other modalities z-scored per case over the foreground, and the largest patch (starting
from the median resampled shape) whose estimated training memory fits the GPU budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from medgn.data.datasets import DatasetIndex
from medgn.errors import InputDataError, ResourceError
from medgn.logs import get_logger, warn_user
from medgn.planning.plan import MAX_PATCH_VOXELS, PLAN_VERSION, Plan

log = get_logger(__name__)

# Anisotropy threshold and coarse-axis percentile from nnU-Net: a ratio above 3 means the median
# would give the coarse axis far too many interpolated slices for most cases.
ANISOTROPY_RATIO = 3.0
COARSE_PERCENTILE = 10
# At most 5 downsamplings (6 stages, the length of the default feature list); an axis is pooled
# only while at least 8 voxels remain, so the bottleneck keeps >= 4.
MAX_DOWNSAMPLINGS = 5
MIN_POOL_SIZE = 8
# Default GPU budget (GB) as in nnU-Net's reference, the one default of `medgn plan` and of a run
# that plans for itself; 85 % of it is planned for, the rest covers the CUDA context and allocator
# fragmentation the estimate leaves out.
DEFAULT_GPU_GB = 8.0
MEMORY_MARGIN = 0.85
# Smallest patch edge worth training on (voxels): below this the context is too small to learn.
MIN_PATCH = 16
Estimator = Callable[..., int]


def target_spacing(spacings: np.ndarray) -> list[float]:
    """Median spacing per axis; on anisotropic data the coarse axis takes the 10th percentile.

    Args:
        spacings: (num_cases, 3) voxel sizes in mm.
    """
    spacings = np.asarray(spacings, dtype=np.float64).reshape(-1, 3)
    target = np.median(spacings, axis=0)
    coarse = int(np.argmax(target))
    others = [a for a in range(3) if a != coarse]
    if target[coarse] / target[others].min() > ANISOTROPY_RATIO:
        value = float(np.percentile(spacings[:, coarse], COARSE_PERCENTILE))
        if value < target[others].max():
            value = float(target[others].max()) + 1e-5  # never finer than the fine axes
        target[coarse] = value
    return [float(v) for v in target]


def plan_for_ct_or_mr(modality: str, stats: dict[str, float] | None = None) -> dict[str, Any]:
    """The normalisation of one channel.

    Args:
        modality: "CT" selects clipping + dataset z-score; "noNorm" (nnU-Net's channel name for a
            channel used as it is) none; anything else per-case z-score. nnU-Net's
            "rescale_to_0_1" and "rgb_to_0_1" get the z-score too, with a warning.
        stats: foreground intensity statistics (``p00_5``, ``p99_5``, ``mean``, ``std``), needed for CT.
    """
    name = modality.strip().lower()
    if name == "nonorm":
        return {"scheme": "none"}
    if name in ("rescale_to_0_1", "rgb_to_0_1"):
        warn_user(
            f"channel {modality!r}: medgn has no rescaling to [0, 1]; the channel is z-scored per case instead",
            log,
        )
    if modality.upper() == "CT":
        if stats is None:
            raise InputDataError("fingerprint", "CT normalisation needs foreground intensity statistics")
        return {
            "scheme": "ct",
            "clip": [stats["p00_5"], stats["p99_5"]],
            "mean": stats["mean"],
            "std": max(stats["std"], 1e-8),
        }
    return {"scheme": "zscore"}


def strides_and_kernels(patch: Sequence[int], spacing: Sequence[float]) -> tuple[list[list[int]], list[list[int]]]:
    """Per-stage strides and kernels for a patch (nnU-Net's rule, simplified).

    An axis is halved while it has at least ``MIN_POOL_SIZE`` voxels and its current spacing is at
    most twice the finest current spacing: on anisotropic data the fine axes are pooled first until
    they catch up with the coarse one. Kernels are 1 along axes still more than 2x coarser.
    """
    size = [int(s) for s in patch]
    sp = [float(s) for s in spacing]
    strides, kernels = [[1, 1, 1]], []
    for _ in range(MAX_DOWNSAMPLINGS):
        finest = min(sp)
        kernels.append([3 if sp[a] <= 2 * finest else 1 for a in range(3)])
        stride = [2 if size[a] >= MIN_POOL_SIZE and sp[a] <= 2 * finest else 1 for a in range(3)]
        if stride == [1, 1, 1]:
            break
        strides.append(stride)
        size = [s // st for s, st in zip(size, stride)]
        sp = [s * st for s, st in zip(sp, stride)]
    kernels = kernels[: len(strides) - 1]
    finest = min(sp)
    kernels.append([3 if sp[a] <= 2 * finest else 1 for a in range(3)])
    return strides, kernels


def _total_stride(strides: Sequence[Sequence[int]]) -> list[int]:
    return [math.prod(s[a] for s in strides) for a in range(3)]


def _fallback_estimate(
    cfg: Any,
    in_channels: int,
    out_channels: int,
    strides: Any,
    kernels: Any,
    patch: Sequence[int],
    batch: int,
    dtype: Any,
) -> int:
    """Rough training memory: ~12 kept activation copies per stage voxel and channel (2 convs, norm,
    activation in encoder and decoder), 2 bytes each (bf16), plus weights with SGD state."""
    features = list(getattr(cfg, "features", (32, 64, 128, 256, 320, 320)))
    voxels, total = float(math.prod(patch)), 0.0
    for s, stride in enumerate(strides):
        voxels /= math.prod(stride)
        total += 12 * features[min(s, len(features) - 1)] * voxels * 2
    params = sum(27 * f * f * 4 for f in features) * 3
    return int(total * batch + params)


def default_estimator() -> Estimator:
    """The model's own estimate when available, else the simple conv-activation estimate."""
    try:
        from medgn.models.summary import estimate_training_memory_bytes
    except ImportError:
        return _fallback_estimate
    return estimate_training_memory_bytes


def _features(n_stages: int) -> tuple[int, ...]:
    try:
        from medgn.models.config import UNet3DConfig

        base = tuple(UNet3DConfig().features)
    except ImportError:
        base = (32, 64, 128, 256, 320, 320)
    return tuple(base[min(i, len(base) - 1)] for i in range(n_stages))


def _fit(patch: list[int], spacing: list[float]) -> tuple[list[int], list[list[int]], list[list[int]]]:
    strides, kernels = strides_and_kernels(patch, spacing)
    total = _total_stride(strides)
    fitted = [max(t, (p // t) * t) for p, t in zip(patch, total)]
    return fitted, strides, kernels


def choose_patch(
    median_shape: Sequence[float],
    spacing: Sequence[float],
    in_channels: int,
    num_classes: int,
    budget_bytes: float,
    estimator: Estimator,
) -> tuple[list[int], list[list[int]], list[list[int]], int, int]:
    """Largest patch (from the median shape down) and batch (2, else 1) that fit the budget.

    Returns:
        (patch, strides, kernels, batch_size, estimated_bytes).
    """
    import torch

    for batch in (2, 1):
        patch = [max(MIN_PATCH, int(round(s))) for s in median_shape]
        while True:
            fitted, strides, kernels = _fit(patch, list(spacing))
            cfg = _model_cfg(len(strides))
            need = int(estimator(cfg, in_channels, num_classes, strides, kernels, fitted, batch, torch.bfloat16))
            if need <= budget_bytes and math.prod(fitted) <= MAX_PATCH_VOXELS:
                return fitted, strides, kernels, batch, need
            # Shrink the axis that is largest in mm (relative to spacing) by one pooling unit.
            mm = [p * s for p, s in zip(patch, spacing)]
            order = sorted(range(3), key=lambda a: -mm[a])
            axis = next((a for a in order if patch[a] > MIN_PATCH), None)
            if axis is None:
                break
            step = _total_stride(strides)[axis]
            patch[axis] = max(MIN_PATCH, patch[axis] - max(step, patch[axis] // 10))
    raise ResourceError(
        "--gpu-memory",
        "no patch fits the GPU memory budget",
        got=f"{budget_bytes / 1e9:.1f} GB",
        expected=f"more memory (a {MIN_PATCH}^3 patch at batch 1 needs more)",
    )


def _model_cfg(n_stages: int) -> Any:
    try:
        from medgn.models.config import UNet3DConfig
    except ImportError:
        return type("Cfg", (), {"features": _features(n_stages)})()
    return UNet3DConfig(features=_features(n_stages))


def make_plan(
    index: DatasetIndex,
    fingerprint: dict[str, Any],
    *,
    gpu_memory_gb: float = DEFAULT_GPU_GB,
    estimator: Estimator | None = None,
) -> Plan:
    """Turn a fingerprint into a plan (the JSON contract with training and inference).

    Args:
        index: the dataset.
        fingerprint: from :func:`medgn.planning.fingerprint.compute_fingerprint`.
        gpu_memory_gb: training GPU memory budget in GB (1e9 bytes).
        estimator: ``f(cfg, in_channels, out_channels, strides, kernel_sizes, patch_size,
            batch_size, dtype) -> bytes``; default: the model's own estimate.

    Returns:
        The :class:`~medgn.planning.plan.Plan`; write it with ``plan.save(path)``.
    """
    if not fingerprint["cases"]:
        raise InputDataError(index.root, "dataset has no training cases to plan from")
    estimator = estimator or default_estimator()
    spacings = np.asarray([c["spacing"] for c in fingerprint["cases"]], dtype=np.float64)
    shapes = np.asarray([c["shape"] for c in fingerprint["cases"]], dtype=np.float64)
    target = target_spacing(spacings)
    resampled = np.median(shapes * spacings / np.asarray(target), axis=0)
    values = sorted(index.labels.values()) if index.labels else sorted(set(fingerprint["label_values_found"]) | {0})
    labels = index.labels or {("background" if v == 0 else f"label_{v}"): v for v in values}
    channels = fingerprint["channels"]
    norms = [plan_for_ct_or_mr(ch["modality"], ch) for ch in channels]
    budget = gpu_memory_gb * 1e9 * MEMORY_MARGIN
    patch, strides, kernels, batch, need = choose_patch(
        resampled.tolist(), target, len(channels), len(values), budget, estimator
    )
    return Plan.from_dict(
        {
            "version": PLAN_VERSION,
            "dataset": {
                "name": index.name,
                "format": index.format,
                "channel_names": list(index.channel_names),
                "modalities": list(index.modalities),
                "labels": labels,
                "regions": index.regions,
            },
            "label_values": values,
            "num_classes": len(values),
            "in_channels": len(channels),
            "target_spacing": target,
            "normalization": norms,
            "patch_size": patch,
            "batch_size": batch,
            "network": {"strides": strides, "kernel_sizes": kernels, "features": list(_features(len(strides)))},
            "memory": {
                "gpu_memory_gb": gpu_memory_gb,
                "estimated_training_bytes": need,
                "estimator": getattr(estimator, "__name__", "custom"),
            },
            "median_resampled_shape": [float(v) for v in resampled],
            "fingerprint": fingerprint,
        },
        "plan",
    )
