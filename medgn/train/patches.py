"""Training patches and validation for a real dataset, wired for exact resume.

:class:`PatchDataset` runs the data layer's training pipeline in two parts: the deterministic
prefix (load, crop, normalise, orient, resample, map labels) is computed once per case and cached
(in memory, or on disk with a ``data.cache_dir``), and the random suffix (foreground-oversampled
crop, augmentation) is re-seeded for every sample from the sampler's per-sample seed. The data
order and every random choice are therefore a pure function of (seed, epoch, position), which is
what makes ``--resume`` continue bit for bit.
Validation lives in :mod:`medgn.train.validation`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from medgn.data.augment import plain_tensor
from medgn.data.config import DataConfig
from medgn.data.datasets import Case
from medgn.data.pipeline import MedgnCompose, cached_dataset, case_item, train_transforms
from medgn.errors import InputDataError
from medgn.planning.plan import Plan

# MONAI random states take 32-bit seeds; the sampler's seeds are 63-bit.
_SEED_MOD = 2**32


def _split_compose(compose: Any) -> tuple[Any, Any]:
    """Split a MONAI Compose at its first random transform: (deterministic, random) parts."""
    from monai.transforms import Randomizable

    steps = list(compose.transforms)
    first = next((i for i, t in enumerate(steps) if isinstance(t, Randomizable)), len(steps))
    return MedgnCompose(steps[:first]), MedgnCompose(steps[first:])


class PatchDataset(torch.utils.data.Dataset):
    """Augmented training patches indexed by ``(case_index, sample_seed)``.

    Args:
        cases: training cases (with labels).
        plan: the run's effective plan.
        cfg: data settings; one crop per sample is drawn (the sampler decides how many samples).
    """

    def __init__(self, cases: Sequence[Case], plan: Plan, cfg: DataConfig) -> None:
        missing = [c.case_id for c in cases if c.label is None]
        if missing:
            raise InputDataError("dataset", "training cases need labels", got=missing[:10])
        self.cases = list(cases)
        one_crop = dataclasses.replace(cfg, samples_per_volume=1)
        self.prep, self.augment = _split_compose(train_transforms(plan, one_crop))
        self.cache = cached_dataset([case_item(c) for c in self.cases], self.prep, plan, cfg, "train")

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        # No copy of the cached case: RandPatchAffined, the first random step, only reads it and hands
        # new tensors to the rest (with the cached foreground list, 4.4 -> 2.4 ms per LA2018 sample).
        data = dict(self.cache[index])
        self.augment.set_random_state(seed=int(seed) % _SEED_MOD)
        out = self.augment(data)
        if isinstance(out, list):  # RandPatchAffined returns a list of crops
            out = out[0]
        return {
            "image": plain_tensor(out["image"]).float(),
            "label": plain_tensor(out["label"]).long(),
            "case_id": self.cases[index].case_id,
        }
