"""Tests for the MONAI pipelines: exact inversion to the input grid, label mapping, loaders, cache keys."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from medgn.data.config import DataConfig
from medgn.data.datasets import Case
from medgn.data.io import read_volume, write_mask
from medgn.data.pipeline import (
    case_item,
    infer_transforms,
    make_val_data,
    pipeline_hash,
    train_transforms,
    val_transforms,
)
from medgn.data.prepare import invert_probabilities, invert_to_input, normalize_channel
from medgn.errors import InputDataError
from tests.data.conftest import make_nifti

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _ns(fields: dict[str, Any]) -> SimpleNamespace:
    """The plan fields a pipeline reads, as attributes (the data layer takes any such object)."""
    return SimpleNamespace(**{"patch_size": (8, 8, 8), **fields})


def _affine(
    perm: tuple[int, int, int], flips: tuple[int, int, int], spacing: tuple[float, float, float], oblique: float = 0.0
) -> np.ndarray:
    """Array axis a runs along world axis perm[a] with sign flips[a] and size spacing[a]."""
    affine = np.zeros((4, 4))
    for a in range(3):
        affine[perm[a], a] = flips[a] * spacing[a]
    c, s = np.cos(oblique), np.sin(oblique)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ affine[:3, :3]
    affine[:3, 3] = [7.0, -4.5, 12.25]
    affine[3, 3] = 1.0
    return affine


def _left_blob(shape: tuple[int, int, int] = (12, 10, 9)) -> np.ndarray:
    """An asymmetric block: any flip or transposition left uncorrected moves it."""
    array = np.zeros(shape, np.float32)
    array[1:6, 2:8, 3:8] = 1.0
    array[1:3, 2:4, 3:5] = 2.0
    return array


PLAN = {"normalization": [{"scheme": "none"}], "label_values": [0, 1, 2]}


@pytest.mark.parametrize(
    ("perm", "flips"),
    [((0, 1, 2), (1, 1, 1)), ((0, 1, 2), (-1, -1, 1)), ((2, 0, 1), (1, -1, -1)), ((1, 2, 0), (-1, 1, -1))],
)
def test_round_trip_is_exact_on_input_grid(
    tmp_path: Path, perm: tuple[int, int, int], flips: tuple[int, int, int]
) -> None:
    spacing = (0.8, 1.5, 3.0)
    affine = _affine(perm, flips, spacing)
    array = _left_blob()
    path = make_nifti(tmp_path / "in.nii.gz", array, affine)
    ras_spacing = [0.0, 0.0, 0.0]
    for a in range(3):
        ras_spacing[perm[a]] = spacing[a]
    data = infer_transforms(_ns({**PLAN, "target_spacing": ras_spacing}))({"image": [str(path)]})
    assert data["image"].shape[1:] != array.shape or perm == (0, 1, 2)  # cropped / reoriented
    back = invert_to_input(data["image"], data, mode="nearest", fill=[0.0])
    assert tuple(back.shape) == (1, *array.shape)
    np.testing.assert_array_equal(back[0].numpy(), array)
    reference = read_volume(path)
    out = write_mask(back[0].numpy().astype(np.uint8), reference, tmp_path / "mask.nii.gz")
    assert np.array_equal(read_volume(out, label=True).affine, reference.affine)


@pytest.mark.parametrize(("target", "oblique"), [((1.0, 1.0, 1.0), 0.0), ((0.7, 0.7, 2.0), 0.4)])
def test_round_trip_with_resampling_keeps_the_blob(
    tmp_path: Path, target: tuple[float, float, float], oblique: float
) -> None:
    array = _left_blob((20, 18, 10))
    affine = _affine((0, 1, 2), (-1, 1, 1), (0.9, 0.9, 2.5), oblique)
    path = make_nifti(tmp_path / "in.nii.gz", array, affine)
    data = infer_transforms(_ns({**PLAN, "target_spacing": list(target)}))({"image": [str(path)]})
    onehot = torch.cat([(data["image"] == v).float() for v in (0, 1, 2)])  # an identity "model"
    labels = torch.round(data["image"][0]).clamp(0, 2).long()
    onehot = torch.nn.functional.one_hot(labels, 3).permute(3, 0, 1, 2).float()
    back = invert_to_input(onehot, data).argmax(0).numpy()
    assert back.shape == array.shape
    fg, ref = back > 0, array > 0
    dice = 2 * (fg & ref).sum() / (fg.sum() + ref.sum())
    assert dice > 0.9, dice


def test_probabilities_are_inverted_as_logits(tmp_path: Path) -> None:
    image = np.zeros((28, 9, 9), np.float32)
    image[2:26, 3:6, 3:6] = 1.0  # the zero border is cropped away: voxels off the crop come back as background
    path = make_nifti(tmp_path / "in.nii.gz", image)
    data = infer_transforms(_ns({**PLAN, "target_spacing": [4.0, 1.0, 1.0]}))({"image": [str(path)]})
    n = int(data["image"].shape[1])
    p1 = torch.full((n, 3, 3), 0.2)
    p1[n // 2] = 0.99  # one confident coarse voxel among uncertain background
    probs = torch.stack([1 - p1, p1])
    back = invert_probabilities(probs, data)
    assert tuple(back.shape) == (2, *image.shape)
    torch.testing.assert_close(back.sum(0), torch.ones(image.shape), rtol=0, atol=1e-5)
    assert bool((back[0][:, :2] > 0.999).all() and (back[0][:, :, 7:] > 0.999).all())
    # The class of every voxel is the one interpolated logits give (here log(p1 / p0) against 0).
    logits = torch.stack([torch.zeros_like(p1), torch.log(p1 / (1 - p1))])
    by_logits = invert_to_input(logits, data, fill=[0.0, -30.0]).argmax(0)
    assert torch.equal(back.argmax(0), by_logits)
    # Averaged probabilities would round the confident voxel off: it reaches further as logits.
    by_probs = invert_to_input(probs, data).argmax(0)
    assert int(by_probs.sum()) > 0 and int(back.argmax(0).sum()) > int(by_probs.sum())


def test_non_contiguous_labels_map_to_class_indices(tmp_path: Path) -> None:
    image = np.ones((6, 6, 6), np.float32)
    label = np.zeros((6, 6, 6), np.uint8)
    label[0, 0, :2], label[1, :3, 0], label[2:5, 2:5, 2:5] = 7, 8, 9
    label[5, 5, 5] = 1
    img_path, lab_path = make_nifti(tmp_path / "i.nii.gz", image), make_nifti(tmp_path / "l.nii.gz", label)
    plan = {"normalization": [{"scheme": "zscore"}], "label_values": [0, 1, 7, 8, 9], "target_spacing": [1.0, 1.0, 1.0]}
    out = val_transforms(_ns(plan))({"image": [str(img_path)], "label": str(lab_path)})
    mapped = out["label"]
    assert mapped.dtype == torch.int64 and mapped.shape == (1, 6, 6, 6)
    counts = {v: int((label == v).sum()) for v in (0, 1, 7, 8, 9)}
    assert [int((mapped == k).sum()) for k in range(5)] == [counts[v] for v in (0, 1, 7, 8, 9)]
    assert (
        torch.isfinite(out["image"]).all() and float(out["image"].abs().max()) == 0.0
    )  # constant image -> zeros, no NaN
    with pytest.raises(InputDataError, match="outside the declared set"):
        val_transforms(_ns({**plan, "label_values": [0, 1]}))({"image": [str(img_path)], "label": str(lab_path)})


def test_normalization_against_float64_reference() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(40.0, 300.0, size=(5, 6, 7))
    ct = normalize_channel(
        torch.from_numpy(x.astype(np.float32)), {"scheme": "ct", "clip": [-100.0, 500.0], "mean": 80.0, "std": 120.0}
    )
    np.testing.assert_allclose(ct.numpy(), (np.clip(x, -100, 500) - 80) / 120, rtol=1e-5, atol=1e-5)
    x[0] = 0.0
    z = normalize_channel(torch.from_numpy(x.astype(np.float32)), {"scheme": "zscore"})
    fg = x[x != 0]
    np.testing.assert_allclose(z.numpy(), (x - fg.mean()) / fg.std(), rtol=1e-4, atol=1e-4)


def _tiny_cases(tmp_path: Path, n: int = 2, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> list[Case]:
    rng = np.random.default_rng(0)
    cases = []
    for i in range(n):
        label = np.zeros((14, 12, 10), np.uint8)
        label[3:7, 4:8, 2:6] = 1
        image = (rng.normal(size=label.shape) + 3 * label).astype(np.float32)
        cases.append(
            Case(
                f"c{i}",
                (make_nifti(tmp_path / f"c{i}_0000.nii.gz", image, spacing=spacing),),
                make_nifti(tmp_path / f"c{i}.nii.gz", label, spacing=spacing),
            )
        )
    return cases


TRAIN_PLAN = {
    "normalization": [{"scheme": "zscore"}],
    "label_values": [0, 1],
    "target_spacing": [1.0, 1.0, 1.0],
    "patch_size": [8, 8, 8],
    "batch_size": 2,
}


def test_train_transforms_are_seeded_and_shapes_are_right(tmp_path: Path) -> None:
    cases = _tiny_cases(tmp_path)
    cfg = DataConfig(num_workers=0, cache_rate=0.0, samples_per_volume=2, foreground_ratio=1.0)

    def first(seed: int) -> list[dict[str, torch.Tensor]]:
        transform = train_transforms(_ns(TRAIN_PLAN), cfg)
        transform.set_random_state(seed=seed)
        return transform(case_item(cases[0]))

    a, b, c = first(5), first(5), first(6)
    assert len(a) == 2 and a[0]["image"].shape == (1, 8, 8, 8) and a[0]["label"].shape == (1, 8, 8, 8)
    assert a[0]["label"].dtype == torch.int64 and set(a[0]["label"].unique().tolist()) <= {0, 1}
    assert all(torch.isfinite(x["image"]).all() for x in a)
    assert all(bool((x["label"] == 1).any()) for x in a)  # foreground_ratio 1: every crop has foreground
    assert torch.equal(a[0]["image"], b[0]["image"]) and not torch.equal(a[0]["image"], c[0]["image"])


def test_cache_is_keyed_by_plan(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    cases = _tiny_cases(tmp_path / "data", 1)
    cfg = DataConfig(num_workers=0, cache_dir=str(tmp_path / "cache"))
    plan_b = {**TRAIN_PLAN, "target_spacing": [2.0, 2.0, 2.0]}
    assert pipeline_hash(_ns(TRAIN_PLAN)) != pipeline_hash(_ns(plan_b))
    first = make_val_data(cases, _ns(TRAIN_PLAN), cfg)[0]
    second = make_val_data(cases, _ns(plan_b), cfg)[0]
    assert first["image"].shape[1:] == (14, 12, 10) and max(second["image"].shape[1:]) <= 8  # two spacings
    assert len(list((tmp_path / "cache").iterdir())) == 2
    again = make_val_data(cases, _ns(TRAIN_PLAN), dataclasses.replace(cfg))[0]  # read back from the cache
    assert torch.equal(again["image"], first["image"])


def test_bad_file_error_is_not_swallowed(tmp_path: Path) -> None:
    (tmp_path / "bad.nii.gz").write_bytes(b"\x00" * 10)
    with pytest.raises(InputDataError, match="bad.nii.gz"):
        infer_transforms(_ns({**PLAN, "target_spacing": [1.0, 1.0, 1.0]}))({"image": [str(tmp_path / "bad.nii.gz")]})


def test_data_config_validation() -> None:
    from medgn.configtools import build
    from medgn.errors import UsageError

    cfg = build(DataConfig, {"limits": {"max_voxels": 1000}, "scale_range": [0.8, 1.2]}, "data")
    assert cfg.limits.max_voxels == 1000 and cfg.scale_range == (0.8, 1.2)
    with pytest.raises(UsageError, match="data.foreground_ratio"):
        build(DataConfig, {"foreground_ratio": 1.5}, "data")
    with pytest.raises(UsageError, match="low <= high"):
        build(DataConfig, {"gamma_range": [1.5, 0.7]}, "data")


@pytest.mark.parametrize("spacing", [(2.0, 2.0, 2.0), (0.7, 1.3, 2.5)])
def test_disk_cache_reads_back_what_it_computed_at_any_spacing(tmp_path: Path, spacing: tuple) -> None:
    """A second epoch from the on-disk cache sees the same resampled volume as the first.

    The cache keeps no affine: whatever is cached must already be resampled, or a second read would
    resample again as if the voxels were 1 mm (version 1 did).
    """
    from medgn.train.patches import PatchDataset

    (tmp_path / "data").mkdir()
    cases = _tiny_cases(tmp_path / "data", 2, spacing=spacing)
    plan = _ns({**TRAIN_PLAN, "target_spacing": [1.0, 1.0, 1.0], "patch_size": [8, 8, 8]})
    in_memory = make_val_data(cases, plan, DataConfig(num_workers=0, cache_rate=1.0))[0]
    expected = tuple(in_memory["image"].shape[1:])
    assert expected[0] > 14 or expected[2] > 10  # the volume really is resampled
    cfg = DataConfig(num_workers=0, cache_dir=str(tmp_path / "cache"))
    val = make_val_data(cases, plan, cfg)
    for _ in range(2):  # computed, then read back from the cache
        again = val[0]
        assert tuple(again["image"].shape[1:]) == expected and tuple(again["label"].shape[1:]) == expected
        np.testing.assert_allclose(np.asarray(again["image"]), np.asarray(in_memory["image"]), atol=1e-6)
    patches = PatchDataset(cases, plan, cfg)
    first, second = patches[(1, 7)], patches[(1, 7)]  # the second read comes from the disk cache
    assert first["image"].shape == (1, 8, 8, 8)
    assert torch.equal(first["image"], second["image"]) and torch.equal(first["label"], second["label"])
    assert tuple(patches.cache[1]["image"].shape[1:]) == expected


def test_training_and_validation_caches_of_one_case_keep_apart(tmp_path: Path) -> None:
    """A case validated in one fold and trained on in the next, with one data.cache_dir.

    MONAI names a cached case by its files alone; the training prefix pads the case to a patch and
    lists its foreground, so reading the validation cache would hand the crop a volume smaller
    than a patch (and validation a padded one).
    """
    from medgn.train.patches import PatchDataset

    (tmp_path / "data").mkdir()
    cases = _tiny_cases(tmp_path / "data", 1)  # 14 x 12 x 10 voxels
    plan = _ns({**TRAIN_PLAN, "patch_size": [16, 16, 16]})
    cfg = DataConfig(num_workers=0, cache_dir=str(tmp_path / "cache"))
    val = make_val_data(cases, plan, cfg)[0]
    assert tuple(val["image"].shape[1:]) == (14, 12, 10)
    patch = PatchDataset(cases, plan, cfg)[(0, 3)]
    assert patch["image"].shape == (1, 16, 16, 16) and bool((patch["label"] == 1).any())
    again = make_val_data(cases, plan, cfg)[0]  # validation still reads its own, unpadded volume
    assert tuple(again["image"].shape[1:]) == (14, 12, 10) and "label_foreground" not in again
    assert sorted(p.name.rsplit("-", 1)[1] for p in (tmp_path / "cache").iterdir()) == ["train", "val"]
