"""Tests for fingerprint, plan rules, `medgn plan` and k-fold splits."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from medgn.cli import main
from medgn.data.datasets import load_dataset
from medgn.data.io import read_volume
from medgn.errors import InputDataError, ModelError, ResourceError
from medgn.planning.fingerprint import compute_fingerprint, intensity_stats, ras_spacing_shape
from medgn.planning.plan import MAX_PATCH_VOXELS, SCHEMA_VERSION, Plan
from medgn.planning.plan_config import PlanConfig
from medgn.planning.planner import (
    DEFAULT_GPU_GB,
    choose_patch,
    make_plan,
    plan_for_ct_or_mr,
    strides_and_kernels,
    target_spacing,
)
from medgn.planning.splits import load_or_create_splits, make_splits
from tests.data.conftest import make_nifti, make_nnunet, mini_msd


def _voxel_estimator(
    cfg: object, cin: int, cout: int, strides: object, kernels: object, patch: list[int], batch: int, dtype: object
) -> int:
    return int(math.prod(patch) * batch * 1000)  # 1 kB per voxel: easy to reason about in tests


def test_target_spacing_median_and_anisotropy() -> None:
    iso = np.array([[0.6, 0.6, 0.6], [0.7, 0.7, 0.7], [0.625, 0.625, 0.625]])
    assert target_spacing(iso) == pytest.approx([0.625, 0.625, 0.625])
    aniso = np.array([[0.8, 0.8, z] for z in (3.0, 4.0, 5.0, 5.0, 6.0, 6.0)])
    # median z 5.5 / 0.8 > 3: the coarse axis takes its 10th percentile, 3.5.
    assert target_spacing(aniso) == pytest.approx([0.8, 0.8, 3.5])


def test_strides_follow_spacing() -> None:
    strides, kernels = strides_and_kernels([256, 256, 24], [0.78, 0.78, 6.5])
    assert strides[:3] == [[1, 1, 1], [2, 2, 1], [2, 2, 1]]  # fine axes pooled first
    assert kernels[0] == [3, 3, 1] and len(kernels) == len(strides) <= 6
    assert (
        strides_and_kernels([64, 64, 64], [1.0, 1.0, 1.0])[0] == [[1, 1, 1]] + [[2, 2, 2]] * 4
    )  # 64 -> 4: pooled while >= 8


def test_patch_shrinks_then_batch_one() -> None:
    patch, strides, _, batch, need = choose_patch(
        [100, 100, 100], [1.0, 1.0, 1.0], 1, 2, 2 * 64**3 * 1000, _voxel_estimator
    )
    total = [math.prod(s[a] for s in strides) for a in range(3)]
    assert batch == 2 and need <= 2 * 64**3 * 1000 and all(p % t == 0 for p, t in zip(patch, total))
    assert math.prod(patch) > 0.5 * 64**3  # shrank to about the budget, not to the minimum
    patch, _, _, batch, _ = choose_patch([20, 20, 20], [1.0, 1.0, 1.0], 1, 2, 1.5 * 16**3 * 1000, _voxel_estimator)
    assert batch == 1 and min(patch) == 16 and math.prod(patch) * 1000 <= 1.5 * 16**3 * 1000
    with pytest.raises(ResourceError):
        choose_patch([20, 20, 20], [1.0, 1.0, 1.0], 1, 2, 100, _voxel_estimator)
    # A memory budget without bound still gives a patch that plans accept (whole-body CT at 1 mm).
    patch, *_ = choose_patch([500, 500, 900], [1.0, 1.0, 1.0], 1, 2, float("inf"), _voxel_estimator)
    assert math.prod(patch) <= MAX_PATCH_VOXELS < 500 * 500 * 900


@pytest.mark.data
def test_ct_sample_gets_ct_scheme_mr_gets_zscore(shared_data: Path) -> None:
    ct = read_volume(shared_data / "samples" / "ct_abdomen_small.nii.gz").array
    stats = intensity_stats(ct[ct > -500].ravel())  # body voxels as the foreground stand-in
    norm = plan_for_ct_or_mr("CT", stats)
    assert norm["scheme"] == "ct" and norm["clip"][0] < 0 < norm["clip"][1] and norm["std"] > 0
    mr = read_volume(shared_data / "samples" / "mr_abdomen_small.nii.gz").array
    assert plan_for_ct_or_mr("MR") == {"scheme": "zscore"}
    assert float(np.percentile(mr, 0.5)) > -500 > float(np.percentile(ct, 0.5))  # the samples are what they claim


def test_nnunet_channel_names_choose_the_normalisation(capsys: pytest.CaptureFixture[str]) -> None:
    """nnU-Net's channel_names name the normalisation too: "noNorm" channels are used as they are."""
    assert plan_for_ct_or_mr("noNorm") == {"scheme": "none"}
    assert plan_for_ct_or_mr("T2") == {"scheme": "zscore"} and capsys.readouterr().err == ""
    assert plan_for_ct_or_mr("rescale_to_0_1") == {"scheme": "zscore"}
    assert "medgn has no rescaling to [0, 1]; the channel is z-scored per case instead" in capsys.readouterr().err


def test_ras_spacing_follows_orientation(tmp_path: Path) -> None:
    affine = np.array([[0, 0, 3.0, 0], [-0.5, 0, 0, 0], [0, 0.7, 0, 0], [0, 0, 0, 1]])  # array z -> R, x -> P, y -> S
    vol = read_volume(make_nifti(tmp_path / "a.nii.gz", np.zeros((4, 5, 6), np.float32), affine))
    spacing, shape = ras_spacing_shape(vol)
    assert spacing == pytest.approx([3.0, 0.5, 0.7]) and shape == [6, 4, 5]


def test_plan_cli_on_tiny_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_nnunet(tmp_path / "ds", n_cases=3, spacing=(1.0, 1.0, 2.0))
    out = tmp_path / "plans" / "new" / "plan.json"  # missing folders are created (runs/ of a fresh clone)
    assert main(["plan", str(root), "--out", str(out), "--folds", "3"]) == 0
    plan = Plan.load(out)
    assert plan.label_values == (0, 1, 2) and plan.num_classes == 3 and plan.in_channels == 2
    assert plan.target_spacing == (1.0, 1.0, 2.0)
    assert [n["scheme"] for n in plan.normalization] == ["ct", "zscore"]  # channel names CT, T2
    assert plan.fingerprint is not None and plan.fingerprint["label_values_found"] == [0, 1, 2]
    assert json.loads(out.read_text())["schema_version"] == SCHEMA_VERSION
    splits = json.loads((out.parent / "splits.json").read_text())
    assert sorted(c for f in splits for c in f["val"]) == ["case0", "case1", "case2"]
    before = out.read_bytes()
    assert main(["plan", str(root), "--out", str(out)]) == 2  # exists, no --overwrite
    assert "output exists" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["plan", str(root), "--out", str(root / "plan.json")]) == 2
    assert not (root / "plan.json").exists()


def test_plan_cli_refusals_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_nnunet(tmp_path / "ds", n_cases=3, spacing=(1.0, 1.0, 2.0))
    plans = tmp_path / "plans"
    plans.mkdir()
    # A folder as --out, with or without --overwrite: a usage error, not a failed rename.
    for extra in ([], ["--overwrite"]):
        assert main(["plan", str(root), "--out", str(plans), *extra]) == 2
        assert "output path is a folder" in capsys.readouterr().err
    assert main(["plan", str(root), "--out", str(plans / "p.json"), "--folds", "1"]) == 2
    assert "at least 2 folds" in capsys.readouterr().err
    assert sorted(p.name for p in plans.iterdir()) == []
    assert main(["plan", str(root), "--out", str(plans / "p.json"), "--folds", "2"]) == 0
    capsys.readouterr()
    # The folds next to the plan are kept: another --folds is refused, none reuses them.
    assert main(["plan", str(root), "--out", str(plans / "q.json"), "--folds", "3"]) == 2
    assert "already holds 2 folds" in capsys.readouterr().err and not (plans / "q.json").exists()
    assert main(["plan", str(root), "--out", str(plans / "q.json")]) == 0
    assert "2 folds" in capsys.readouterr().out
    # Another dataset's folds in the folder: refused before its plan is written.
    other = make_nnunet(tmp_path / "ds2", n_cases=4, spacing=(1.0, 1.0, 2.0))
    assert main(["plan", str(other), "--out", str(plans / "other.json")]) == 3
    assert "a plan of another dataset goes into its own folder (another --out)" in capsys.readouterr().err
    assert sorted(p.name for p in plans.iterdir()) == ["p.json", "q.json", "splits.json"]
    # Refused before the plan's folder is made: a run with too few folds leaves no new folder.
    assert main(["plan", str(root), "--out", str(tmp_path / "fresh" / "p.json"), "--folds", "1"]) == 2
    assert not (tmp_path / "fresh").exists()
    (tmp_path / "a_file").write_text("x")
    assert main(["plan", str(root), "--out", str(tmp_path / "a_file" / "sub" / "p.json")]) == 2
    assert "output folder cannot be created: a parent is not a folder" in capsys.readouterr().err
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    assert main(["plan", str(root), "--out", str(tmp_path / "dangling" / "sub" / "p.json")]) == 2
    assert "a parent is not a folder" in capsys.readouterr().err


@pytest.mark.data
def test_la2018_plan_chooses_0625_and_zscore(shared_data: Path, tmp_path: Path) -> None:
    index = load_dataset(mini_msd(shared_data / "LA2018", tmp_path / "la", 4))
    plan = make_plan(index, compute_fingerprint(index), gpu_memory_gb=8, estimator=_voxel_estimator)
    assert plan.target_spacing == pytest.approx([0.625, 0.625, 0.625])
    assert plan.normalization == ({"scheme": "zscore"},) and plan.label_values == (0, 1)
    json.dumps(plan.to_dict(), allow_nan=False)  # the plan is plain JSON


def test_splits(tmp_path: Path) -> None:
    ids = [f"c{i}" for i in range(11)]
    splits = make_splits(ids, 5, seed=3)
    assert splits == make_splits(list(reversed(ids)), 5, seed=3)
    assert sorted(c for f in splits for c in f["val"]) == sorted(ids)
    assert all(set(f["train"]).isdisjoint(f["val"]) and len(f["train"]) + len(f["val"]) == 11 for f in splits)
    assert splits != make_splits(ids, 5, seed=4)
    path = tmp_path / "splits.json"
    assert load_or_create_splits(path, ids, 5, 3) == splits
    assert load_or_create_splits(path, ids, 5, 99) == splits  # written once, then only read
    with pytest.raises(InputDataError, match="do not match"):
        load_or_create_splits(path, ids[:-1])


def test_fallback_estimator_grows_with_patch_and_batch() -> None:
    from medgn.planning.planner import _fallback_estimate, _model_cfg

    strides = [[1, 1, 1]] + [[2, 2, 2]] * 4
    small = _fallback_estimate(_model_cfg(5), 1, 2, strides, None, [64, 64, 64], 2, None)
    assert _fallback_estimate(_model_cfg(5), 1, 2, strides, None, [128, 64, 64], 2, None) > 1.9 * small - 2e8
    assert _fallback_estimate(_model_cfg(5), 1, 2, strides, None, [64, 64, 64], 1, None) < small
    patch, _, _, batch, need = choose_patch([200, 200, 200], [1.0, 1.0, 1.0], 1, 2, 4e9, _fallback_estimate)
    assert need <= 4e9 and batch == 2 and max(patch) < 200


# A plan as medgn wrote it before schema_version existed (and as old checkpoints hold it).
OLD_PLAN = {
    "version": 1,
    "label_values": [0, 1, 4],
    "num_classes": 3,
    "in_channels": 1,
    "target_spacing": [0.8, 0.8, 2.5],
    "normalization": [{"scheme": "zscore"}],
    "patch_size": [64, 64, 32],
    "batch_size": 2,
    "network": {"strides": [[1, 1, 1], [2, 2, 1]], "kernel_sizes": [[3, 3, 1], [3, 3, 3]]},
}


def test_plan_file_without_schema_version_is_version_1_and_round_trips(tmp_path: Path) -> None:
    old = tmp_path / "old.json"
    old.write_text(json.dumps(OLD_PLAN))
    plan = Plan.load(old)
    assert plan.schema_version == 1 and plan.label_values == (0, 1, 4) and plan.patch_size == (64, 64, 32)
    assert plan.network.strides == ((1, 1, 1), (2, 2, 1))
    new = plan.save(tmp_path / "new.json")
    written = json.loads(new.read_text())
    # Same keys and values as before, plus schema_version.
    assert written == {**OLD_PLAN, "schema_version": 1}
    assert Plan.load(new) == plan
    assert Plan.from_dict(plan.to_dict()) == plan  # what a checkpoint stores


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"patch_size": None}, "misses key(s) patch_size"),
        ({"num_classes": "three"}, "num_classes is not an integer"),
        ({"target_spacing": [1.0, 1.0]}, "target_spacing is malformed"),
        ({"label_values": [0, 1]}, "label_values does not match num_classes"),
        ({"normalization": [{"scheme": "zscore"}] * 2}, "normalization does not match in_channels"),
        ({"schema_version": 2}, "unsupported plan schema_version"),
        ({"target_spacing": [float("inf"), 1.5, 1.5]}, "target_spacing is malformed"),
        ({"normalization": [{"scheme": "ct"}]}, "normalization[0] is malformed ('clip' must be two finite numbers)"),
        ({"normalization": [{"scheme": "ct", "clip": [5, 1], "mean": 0, "std": 1}]}, "'clip' must be [low, high]"),
        ({"normalization": [{"scheme": "minmax"}]}, "unknown scheme 'minmax'"),
        ({"patch_size": [512, 512, 512]}, "patch_size is too large"),
        ({"median_resampled_shape": "abc"}, "median_resampled_shape is malformed"),
        ({"dataset": "oops"}, "dataset is malformed"),
        ({"label_values": [0, -5, 2]}, "label_values is malformed"),
        ({"label_values": [0, 70000, 2]}, "label_values is malformed"),
        ({"label_values": [0, 2, 1]}, "label_values is malformed"),
    ],
)
def test_bad_plan_names_file_and_key(tmp_path: Path, change: dict, message: str) -> None:
    data = {k: v for k, v in {**OLD_PLAN, **change}.items() if v is not None}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputDataError) as info:
        Plan.load(path)
    assert info.value.code == 3 and message in info.value.one_line() and str(path) in info.value.one_line()
    with pytest.raises(ModelError) as model_info:  # the same check on a checkpoint's plan: exit 4
        Plan.from_dict(data, "model.pt", error=ModelError)
    assert model_info.value.code == 4 and message in model_info.value.one_line()


def test_missing_or_unreadable_plan_file_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match="plan file not found"):
        Plan.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputDataError, match="cannot read plan"):
        Plan.load(tmp_path / "bad.json")


def test_gpu_memory_default_is_one_constant() -> None:
    assert PlanConfig().gpu_memory_gb == DEFAULT_GPU_GB == 8.0


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_plan_path_that_is_no_file_is_named_not_opened(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "plan.json"
    if kind == "fifo":
        os.mkfifo(path)  # reading it would block until a writer came
    else:
        path.mkdir()
    with pytest.raises(InputDataError, match="plan file is (neither a regular file|a folder)"):
        Plan.load(path)


def _shift_label(root: Path, case: str, affine_change: dict[str, object]) -> Path:
    import nibabel as nib

    path = root / "labelsTr" / f"{case}.nii.gz"
    img = nib.load(path)
    array = np.asarray(img.dataobj)
    if "pad" in affine_change:
        array = np.pad(array, ((0, int(affine_change["pad"])), (0, 0), (0, 0)))
        array[-1] = 1  # foreground where the image has no voxels
    affine = img.affine.copy()
    affine[:3, 3] += np.asarray(affine_change.get("shift", (0, 0, 0)))
    path.unlink()
    return make_nifti(path, array.astype(np.uint8), affine)


@pytest.mark.parametrize("change", [{"pad": 3}, {"shift": (5.0, 0, 0)}], ids=["larger_label", "moved_label"])
def test_plan_refuses_a_label_off_its_images_grid(tmp_path: Path, capsys: pytest.CaptureFixture[str], change) -> None:
    # The statistics sample the images at the label's voxel positions: a larger label was an internal
    # error (IndexError), a moved one a plan from mismatched voxels, exit 0.
    root = make_nnunet(tmp_path / "ds", n_cases=3, spacing=(1.0, 1.0, 2.0))
    label = _shift_label(root, "case1", change)
    out = tmp_path / "plans" / "plan.json"
    assert main(["plan", str(root), "--out", str(out)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"medgn: error: {label}: label geometry differs from image"), err
    assert not out.parent.exists()


def test_plan_refuses_a_channel_off_the_first_channels_grid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_nnunet(tmp_path / "ds", n_cases=3, spacing=(1.0, 1.0, 2.0))
    channel = root / "imagesTr" / "case2_0001.nii.gz"
    make_nifti(channel, np.zeros((6, 5, 4), np.float32), spacing=(1.0, 1.0, 3.0))
    assert main(["plan", str(root), "--out", str(tmp_path / "p" / "plan.json")]) == 3
    assert f"{channel}: channel 1 geometry differs from" in capsys.readouterr().err


def test_plan_out_ending_in_a_slash_is_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_nnunet(tmp_path / "ds", n_cases=3, spacing=(1.0, 1.0, 2.0))
    out = str(tmp_path / "newrun") + "/"
    assert main(["plan", str(root), "--out", out]) == 2
    assert "output path is a folder" in capsys.readouterr().err
    assert not (tmp_path / "newrun").exists() and not (tmp_path / "splits.json").exists()


def test_plan_says_when_it_makes_fewer_folds_than_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_nnunet(tmp_path / "ds", n_cases=3, spacing=(1.0, 1.0, 2.0))
    out = tmp_path / "p" / "plan.json"
    assert main(["plan", str(root), "--out", str(out), "--folds", "10"]) == 0
    captured = capsys.readouterr()
    assert "10 folds asked (--folds) but the dataset has 3 cases: 3 folds" in captured.err
    assert len(json.loads((out.parent / "splits.json").read_text())) == 3


SPLIT_PROBLEMS = [
    ("leak", lambda s: s[0]["train"].append(s[0]["val"][0]), "fold 0 trains on its own validation cases: case"),
    (
        "unknown",
        lambda s: s[1]["train"].append("nonexistent_case"),
        "fold 1 trains on cases not in the dataset: nonexi",
    ),
    ("empty_train", lambda s: s[2].update(train=[]), "fold 2 has no training cases"),
    ("twice", lambda s: s[1]["val"].append(s[0]["val"][0]), "cases listed more than once in the 'val' lists: case"),
    ("twice_in_a_fold", lambda s: s[0]["val"].append(s[0]["val"][0]), "listed more than once in the 'val' lists"),
    ("train_twice", lambda s: s[0]["train"].append(s[0]["train"][0]), "fold 0 lists training cases twice: case"),
    ("empty_val", lambda s: s.append({"train": ["case0"], "val": []}), "fold 3 validates no case"),
    (
        "renamed",
        lambda s: s[0]["val"].__setitem__(0, "other"),
        "1 not in the dataset (other); 1 of the dataset's missing",
    ),
    ("not_folds", lambda s: s.append({"train": "case0", "val": []}), "splits file is malformed"),
]


@pytest.mark.parametrize(("name", "change", "words"), SPLIT_PROBLEMS, ids=[p[0] for p in SPLIT_PROBLEMS])
def test_a_hand_made_splits_file_is_checked_fold_by_fold(tmp_path: Path, name: str, change, words: str) -> None:
    path = tmp_path / "splits.json"
    ids = [f"case{i}" for i in range(6)]
    splits = make_splits(ids, 3, 0)
    change(splits)
    path.write_text(json.dumps(splits))
    with pytest.raises(InputDataError) as info:
        load_or_create_splits(path, ids)
    assert info.value.where == str(path) and words in info.value.one_line(), info.value.one_line()


def test_channel_order_is_judged_by_names_whatever_their_case() -> None:
    from medgn.planning.plan import reordered

    assert reordered(["FLAIR", "T1c"], ["T1c", "FLAIR"]) == [1, 0]
    assert reordered(["FLAIR", "T1c"], ["t1c", "flair"]) == [1, 0]  # lowercase file suffixes
    assert reordered(["FLAIR", "T1c"], ["flair", "t1c"]) is None  # the same order
    assert reordered(["MR", "MR"], ["MR", "MR"]) is None and reordered(["CT"], ["T2"]) is None
