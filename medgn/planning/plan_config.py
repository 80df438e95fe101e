"""The ``plan`` section of a run config: how a run adapts the dataset plan, and its split.

``medgn plan`` chooses spacing, patch size and network depth from the data and a GPU memory
budget. A run config may override the spacing and patch size (the CPU recipes train at a coarser
spacing on small patches) and chooses the cross-validation split. :func:`apply_plan_config`
returns the plan the run actually uses, with strides and kernel sizes recomputed for the new patch
and spacing, so the checkpoint's plan always describes the network that was trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from medgn.planning.plan import NetworkPlan, Plan
from medgn.planning.planner import DEFAULT_GPU_GB, strides_and_kernels


@dataclass(frozen=True)
class PlanConfig:
    """Plan overrides and the cross-validation split of a run.

    Attributes:
        gpu_memory_gb: memory budget used when the run has to make a plan itself.
        target_spacing: voxel size in mm (x, y, z) replacing the planned one; null keeps the plan's.
        patch_size: training patch in voxels replacing the planned one (rounded down to a multiple
            of the network's total stride); null keeps the plan's.
        max_stages: at most this many resolution stages (null: as planned).
        n_folds: folds of the cross-validation split (written once to splits.json).
        split_seed: seed of the split.
    """

    # 1..2048 GB: from a small laptop GPU to a multi-GPU node's pooled memory.
    gpu_memory_gb: float = field(default=DEFAULT_GPU_GB, metadata={"min": 1.0, "max": 2048.0})
    target_spacing: tuple[float, float, float] | None = field(default=None, metadata={"min": 1e-3, "max": 100.0})
    patch_size: tuple[int, int, int] | None = field(default=None, metadata={"min": 8, "max": 1024})
    max_stages: int | None = field(default=None, metadata={"min": 2, "max": 8})
    # 2..20 folds: fewer is not cross-validation, more leaves too few validation cases per fold.
    n_folds: int = field(default=5, metadata={"min": 2, "max": 20})
    # The range of train.seed: what every random generator accepts.
    split_seed: int = field(default=0, metadata={"min": 0, "max": 2**31 - 1})


def apply_plan_config(plan: Plan, cfg: PlanConfig, features: tuple[int, ...]) -> tuple[Plan, tuple[int, ...]]:
    """The plan a run uses and the matching per-stage feature widths.

    Args:
        plan: the dataset plan (from ``medgn plan``).
        cfg: the run's plan section.
        features: the model section's widths; truncated to the number of stages.

    Returns:
        (effective plan, effective features). The stage count is the smallest of the plan's, the
        widths given, and ``max_stages``.
    """
    spacing = [float(s) for s in (cfg.target_spacing or plan.target_spacing)]
    patch = [int(p) for p in (cfg.patch_size or plan.patch_size)]
    strides, kernels = plan.network.strides, plan.network.kernel_sizes
    if cfg.target_spacing is not None or cfg.patch_size is not None or strides is None or kernels is None:
        strides, kernels = strides_and_kernels(patch, spacing)
    stages = min(len(strides), len(features), cfg.max_stages or len(strides))
    strides, kernels = [list(s) for s in strides[:stages]], [list(k) for k in kernels[:stages]]
    total = [math.prod(s[a] for s in strides) for a in range(3)]
    patch = [max(t, (p // t) * t) for p, t in zip(patch, total)]
    network = NetworkPlan(tuple(map(tuple, strides)), tuple(map(tuple, kernels)), tuple(features[:stages]))
    return plan.replace(target_spacing=tuple(spacing), patch_size=tuple(patch), network=network), tuple(
        features[:stages]
    )
