"""Memory preflight of a training run: the estimated peak against what the machine has, before any work.

:func:`check_training_memory` runs when the run's plan is final and before the run folder gets its
config and plan. It estimates one training step of the run's network at its patch, batch size and
precision with the planner's model (:func:`medgn.models.summary.summary`: weights, gradients,
optimizer state, kept activations, backward transients), adds the training cases as the data
pipeline holds them (padded to the patch, cached in memory), and compares both with what the
device has: ``MemAvailable`` (capped by the process's cgroup limit, v1 or v2, less what the group
uses other than reclaimable page cache, and by ``ulimit -v``) for the CPU,
``torch.cuda.mem_get_info`` for a GPU. A run that clearly cannot fit is refused with a
:class:`~medgn.errors.ResourceError` (exit 5) naming the setting to change; ``train.memory_check:
false`` trains anyway. A patch far larger than every case gets a warning. Headers only: no pixels
are read and nothing large is allocated.
"""

from __future__ import annotations

import math
import os
import resource
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medgn.errors import ResourceError, UsageError
from medgn.logs import get_logger, warn_user
from medgn.planning.plan import MAX_PATCH_VOXELS, Plan

log = get_logger(__name__)

GB = 1e9
# The estimate's error on the CPU (README "Memory estimate", features 16-128): the measured growth of a
# step is 9-13 % below the estimate for group_torch and batch norms, 31 % below with activation
# checkpointing, 11-17 % above it for medgn's group norm; for the narrow (4, 8) network of the tests
# at 96^3-128^3 it is 1.6x the estimate. A run is refused only when 3/4 of the estimate is more than
# is available: even the estimate's largest overcount leaves it short, so a refusal is never a
# borderline case (what the estimate leaves out only adds to it).
REFUSE_FRACTION = 0.75
# A patch more than this many times the largest case (every axis, at the plan's spacing) is padding.
OVERSIZED_PATCH_FACTOR = 2.0
# Copies of one sample alive in the data pipeline: the crop, augmentation's output, the collated batch.
SAMPLE_COPIES = 3
# The cached case's dtypes: image channels float32, label float32 (the reader's label dtype).
CASE_BYTES_PER_VOXEL_AND_CHANNEL = 4
# A training sample: image channels float32, label int64.
SAMPLE_IMAGE_BYTES, SAMPLE_LABEL_BYTES = 4, 8
# Optimizer buffers per parameter: SGD momentum keeps one, AdamW two.
OPTIMIZER_STATES = {"sgd": 1, "adamw": 2}
# Where the process's memory cgroup is read (tests point these at a fake tree).
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 writes "no limit" as the largest page-aligned int64 (9223372036854771712); anything at or
# above 2^62 bytes (4 EiB) is no limit.
V1_UNLIMITED = 2**62


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of a training run, in bytes.

    Attributes:
        step_bytes: one training step on the training device (weights, gradients, optimizer state,
            kept activations, backward transients).
        data_bytes: host memory of the data pipeline (cached padded cases, working copies, samples).
        dtype: the activations' dtype the step was estimated with.
    """

    step_bytes: int
    data_bytes: int
    dtype: str


def available_cpu_bytes() -> int | None:
    """Host memory this process can still take: ``MemAvailable``, capped by cgroup and ``ulimit -v``.

    Returns None when nothing can be read (then no check is made).
    """
    found: list[int] = []
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)  # reported in kB
                    break
    except (OSError, ValueError, IndexError):
        pass
    if not found:
        try:
            found.append(int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE")))
        except (OSError, ValueError, AttributeError):
            pass
    cgroup = cgroup_available_bytes()
    if cgroup is not None:
        found.append(cgroup)
    try:  # ulimit -v: the address-space limit minus what the process has mapped
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            found.append(max(0, soft - _vm_size()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def cgroup_available_bytes() -> int | None:
    """What this process's memory cgroup still lets it take; None without a limit or readable files.

    The process's own group (``/proc/self/cgroup``) and each of its parents with a limit count, the
    tightest wins: cgroup v2 ``memory.max - (memory.current - inactive_file)``, cgroup v1
    ``memory.limit_in_bytes - (memory.usage_in_bytes - total_inactive_file)``. The group's usage
    includes the page cache of every file read (``train`` has just read the dataset); the inactive part
    of it is dropped on demand, so it is not counted as used (docker stats and cAdvisor do the same).
    """
    try:
        lines = PROC_SELF_CGROUP.read_text(encoding="ascii").splitlines()
    except (OSError, ValueError):
        return None
    found = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # v2 (unified): 0::/<path>
            found += _group_room(CGROUP_ROOT, path, "memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # v1: N:memory:/<path>
            found += _group_room(
                CGROUP_ROOT / "memory", path, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"
            )
    return min(found) if found else None


def _group_room(root: Path, path: str, limit_file: str, usage_file: str, inactive_key: str) -> list[int]:
    """Each limited group from ``root/path`` up to ``root``: its limit minus its usage less inactive file cache.

    Without a cgroup namespace a container sees its host path in ``/proc/self/cgroup`` while its own
    group is mounted at ``root``: a path that does not exist there starts the walk at ``root``.
    """
    group = root / path.strip("/")
    if not group.is_dir():
        group = root
    rooms = []
    while True:
        try:
            limit_text = (group / limit_file).read_text(encoding="ascii").strip()
            limit = None if limit_text == "max" else int(limit_text)
            if limit is not None and limit < V1_UNLIMITED:
                usage = int((group / usage_file).read_text(encoding="ascii").strip())
                rooms.append(max(0, limit - max(0, usage - _stat_value(group / "memory.stat", inactive_key))))
        except (OSError, ValueError):
            pass  # no limit here (the root group has no memory.max) or unreadable: the parents may still have one
        if group == root or root not in group.parents:
            return rooms
        group = group.parent


def _stat_value(path: Path, key: str) -> int:
    """One counter of a cgroup's ``memory.stat`` (bytes); 0 when the file or the key is missing."""
    try:
        for line in path.read_text(encoding="ascii").splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _vm_size() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise ValueError("VmSize not in /proc/self/status")


def available_device_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device (``torch.cuda.mem_get_info``); None for other devices."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def case_grids(cases: Sequence[Any], target_spacing: Sequence[float], limits: Any) -> list[tuple[int, int, int]]:
    """Each case's grid at the plan's spacing, from its first channel's header (no pixels read)."""
    from medgn.data.multichannel import file_channel_count
    from medgn.data.preflight import read_header
    from medgn.data.workload import resampled_shape

    grids = []
    for case in cases:
        first = case.images[0]
        channels = file_channel_count(first) if len(case.images) == 1 else 1  # one 4D MSD file per case
        info = read_header(first, limits, channels=channels)
        grids.append(resampled_shape(info.shape, info.affine, target_spacing))
    return grids


def estimate_training_memory(
    cfg: Any, plan: Plan, grids: Sequence[Sequence[int]], device: torch.device
) -> MemoryEstimate:
    """Estimate the peak memory of training ``plan`` with run config ``cfg`` on ``device``.

    Args:
        cfg: the resolved :class:`~medgn.config.RunConfig` (``model``, ``train``, ``data``).
        plan: the run's final plan (patch, network, channels, classes).
        grids: the training cases' shapes at the plan's spacing.
        device: the training device (its type chooses the precision ``train.amp`` resolves to).
    """
    from medgn.models.summary import estimate_training_memory_bytes
    from medgn.train.optim import resolve_amp

    dtype, _ = resolve_amp(cfg.train.amp, device)
    dtype = dtype or torch.float32
    patch = [int(p) for p in plan.patch_size]
    batch = int(cfg.train.batch_size)
    step = estimate_training_memory_bytes(  # on the meta device: any patch size costs milliseconds, no memory
        cfg.model,
        plan.in_channels,
        plan.num_classes,
        plan.network.strides,
        plan.network.kernel_sizes,
        patch,
        batch,
        dtype,
        optimizer_states=OPTIMIZER_STATES.get(cfg.train.optimizer, 2),
    )
    # The pipeline pads every case to the patch (SpatialPadd) before it is cached.
    per_voxel = (plan.in_channels + 1) * CASE_BYTES_PER_VOXEL_AND_CHANNEL
    padded = sorted(
        (math.prod(max(int(g), p) for g, p in zip(grid, patch)) * per_voxel for grid in grids), reverse=True
    )
    data = cfg.data
    cached = 0
    if data.cache_dir is None and data.cache_rate > 0:
        cached = sum(padded[: int(len(padded) * data.cache_rate)])  # the largest: MONAI caches the first ones
    sample = math.prod(patch) * (plan.in_channels * SAMPLE_IMAGE_BYTES + SAMPLE_LABEL_BYTES) * SAMPLE_COPIES
    # Each loader process (workers and the main one) holds one case being prepared and a batch of samples.
    working = (int(data.num_workers) + 1) * ((padded[0] if padded else 0) + batch * sample)
    return MemoryEstimate(step, cached + working, str(dtype).replace("torch.", ""))


def check_training_memory(
    cfg: Any, plan: Plan, cases: Sequence[Any], device: torch.device, *, warn: bool = True
) -> MemoryEstimate | None:
    """Refuse a run whose patch cannot be stored or whose estimated memory clearly does not fit.

    Args:
        cfg: the resolved run config; ``train.memory_check: false`` skips the memory comparison.
        plan: the run's final plan.
        cases: the fold's training cases.
        device: the training device.
        warn: print warnings on stderr (rank 0); they always go to the log.

    Returns:
        The estimate, or None when the memory check is switched off.

    Raises:
        UsageError: a patch above the plan's voxel limit (no plan file could hold it; exit 2).
        ResourceError: 3/4 of the estimate exceeds the available memory (exit 5).
    """
    patch = [int(p) for p in plan.patch_size]
    grids = case_grids(cases, plan.target_spacing, cfg.data.limits)
    largest = [max(int(g[a]) for g in grids) for a in range(3)] if grids else None
    if largest is not None and all(p > OVERSIZED_PATCH_FACTOR * s for p, s in zip(patch, largest)):
        message = (
            f"plan.patch_size {patch} is more than {OVERSIZED_PATCH_FACTOR:g}x the largest training case in every "
            f"axis ({largest} voxels at {list(plan.target_spacing)} mm): every case is padded to the patch, "
            f"which costs memory and time and adds no image; a patch near {largest} sees whole cases"
        )
        if warn:
            warn_user(message, log)
        else:
            log.warning(message)
    estimate = _check_memory(cfg, plan, grids, device) if cfg.train.memory_check else None
    if estimate is None:
        log.info("memory check switched off (train.memory_check: false)")
    if math.prod(patch) > MAX_PATCH_VOXELS:  # a plan.json that Plan.load, inference and resume refuse
        raise UsageError(
            "plan.patch_size",
            "the patch has more voxels than a plan may hold",
            got=f"{patch} = {math.prod(patch)} voxels",
            expected=f"<= {MAX_PATCH_VOXELS} voxels (256^3)",
        )
    return estimate


def _check_memory(cfg: Any, plan: Plan, grids: Sequence[Sequence[int]], device: torch.device) -> MemoryEstimate:
    """The estimate, or a ResourceError when 3/4 of it exceeds the available memory."""
    patch = [int(p) for p in plan.patch_size]
    largest = [max(int(g[a]) for g in grids) for a in range(3)] if grids else None
    estimate = estimate_training_memory(cfg, plan, grids, device)
    cpu = available_cpu_bytes()
    gpu = available_device_bytes(device)
    on_gpu = device.type == "cuda"
    host_need = estimate.data_bytes + (0 if on_gpu else estimate.step_bytes)
    log.info(
        "memory estimate: step %.2f GB on %s (%s, patch %s, batch %d), data pipeline %.2f GB; available: "
        "host %s GB, device %s GB",
        estimate.step_bytes / GB,
        device,
        estimate.dtype,
        patch,
        cfg.train.batch_size,
        estimate.data_bytes / GB,
        "?" if cpu is None else f"{cpu / GB:.2f}",
        "-" if gpu is None else f"{gpu / GB:.2f}",
    )
    step = f"training step {estimate.step_bytes / GB:.1f} GB ({estimate.dtype}, patch {patch} x batch "
    step += f"{cfg.train.batch_size})"
    cases_text = f"padded training cases and samples {estimate.data_bytes / GB:.1f} GB"
    override = "or train.memory_check=false to train anyway"
    if on_gpu and gpu is not None and REFUSE_FRACTION * estimate.step_bytes > gpu:
        raise ResourceError(
            "plan.patch_size",
            f"training would need about {estimate.step_bytes / GB:.1f} GB of GPU memory, "
            f"{gpu / GB:.1f} GB free on {device}",
            got=step,
            expected=f"a smaller plan.patch_size or train.batch_size, model.checkpoint=true, {override}",
        )
    if cpu is not None and REFUSE_FRACTION * host_need > cpu:
        # The cases, not the step, are what is too large: unless the patch pads them, cache them on disk.
        data_heavy = estimate.data_bytes > (0 if on_gpu else estimate.step_bytes)
        padded = largest is not None and any(p > s for p, s in zip(patch, largest))
        settings = (
            "a smaller plan.patch_size or train.batch_size, model.checkpoint=true"
            if padded or not data_heavy
            else "data.cache_dir (cache on disk) or data.cache_rate below 1"
        )
        parts = cases_text if on_gpu else f"{step}, {cases_text}"
        raise ResourceError(
            "plan.patch_size" if padded or not data_heavy else "data.cache_rate",
            f"training would need about {host_need / GB:.1f} GB of memory, {cpu / GB:.1f} GB available",
            got=parts,
            expected=f"{settings}, {override}",
        )
    return estimate
