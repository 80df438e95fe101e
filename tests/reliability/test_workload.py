"""Limits on the work a file implies: its size once resampled, and the sliding windows over it.

The issue's case -- a 20^3 scan with 50 mm voxels that the model's spacing turns into hundreds of
millions of voxels -- is refused with code 5 in well under a second by ``medgn infer``, naming the
file, its spacing, the size it would become and ``--max-resampled-voxels``; the flag raises the
limit. ``verify --plan``, ``plan`` and ``train`` (flag and ``data.limits`` config key) refuse it too,
and the same check runs inside the MONAI pipeline right before ``Spacingd``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from medgn.config import load_run_config
from medgn.data.preflight import Limits
from medgn.data.workload import check_workload, count_windows, resampled_shape
from medgn.errors import MedgnError
from tests.reliability.conftest import (
    SPACING,
    assert_clean_failure,
    cli,
    image_array,
    label_array,
    make_msd,
    run_medgn,
    tiny_plan,
    tree_hashes,
    write_nifti,
)


def _diag(spacing: float | tuple[float, float, float]) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.diag(np.broadcast_to(spacing, 3))
    return affine


def test_resampled_shape_follows_ras_axes_and_spacing() -> None:
    assert resampled_shape((20, 20, 20), _diag(50.0), (1.875, 1.875, 1.875)) == (534, 534, 534)
    permuted = np.array([[0, 0, 3.0, 0], [2.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])  # file axes k, i, j -> R, A, S
    assert resampled_shape((10, 20, 30), permuted, (1.0, 1.0, 1.0)) == (90, 20, 20)
    assert resampled_shape((3, 3, 3), _diag(1.5), (0.5, 0.5, 0.5)) == (9, 9, 9)  # no extra voxel from rounding


@pytest.mark.parametrize(
    ("shape", "roi", "overlap"),
    [
        ((8, 8, 8), (8, 8, 8), 0.5),
        ((3, 40, 17), (8, 8, 8), 0.5),
        ((100, 9, 64), (16, 8, 32), 0.25),
        ((33, 33, 33), (8, 8, 8), 0.0),
    ],
)
def test_window_count_equals_monai(shape: tuple[int, int, int], roi: tuple[int, int, int], overlap: float) -> None:
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    padded = tuple(max(s, r) for s, r in zip(shape, roi))
    expected = len(dense_patch_slices(padded, roi, _get_scan_interval(padded, roi, 3, (overlap,) * 3)))
    assert count_windows(shape, roi, overlap) == expected


def test_infer_refuses_a_scan_that_explodes_when_resampled(
    tmp_path: Path, model_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    scan = write_nifti(
        inputs / "coarse.nii.gz", np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32), _diag(50.0)
    )
    before = {inputs: tree_hashes(inputs)}
    out = tmp_path / "out"
    start = time.perf_counter()
    result = cli(["infer", "--model", model_run, "--input", scan, "--output", out, "--no-progress"], capsys)
    elapsed = time.perf_counter() - start
    words = [
        "too large once resampled",
        "(50, 50, 50) mm",
        "(667, 800, 500) = 266800000 voxels",
        "--max-resampled-voxels",
    ]
    assert_clean_failure(
        result, 5, [scan], words, outputs=[out / "coarse.nii.gz", out / "coarse.json", out], before=before
    )
    assert elapsed < 5.0, elapsed  # refused from the grid's size: nothing resampled (minutes otherwise)


def test_the_flags_set_the_resampled_and_window_limits(
    tmp_path: Path, model_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "in").mkdir()
    scan = write_nifti(tmp_path / "in" / "s.nii.gz", image_array(), _diag(3.0))  # -> (20, 22, 12)
    argv = ["infer", "--model", model_run, "--input", scan, "--no-progress"]
    result = cli([*argv, "--output", tmp_path / "o1", "--max-resampled-voxels", "5000"], capsys)
    assert_clean_failure(result, 5, [scan], ["(20, 22, 12) = 5280 voxels", "expected <= 5000 voxels"])
    result = cli([*argv, "--output", tmp_path / "o2", "--max-windows", "10"], capsys)
    assert_clean_failure(result, 5, [scan], ["too many sliding windows", "--max-windows"])
    result = cli([*argv, "--output", tmp_path / "o3", "--max-resampled-voxels", "5280", "--max-windows", "500"], capsys)
    assert result.code == 0, result.err
    assert (tmp_path / "o3" / "s.nii.gz").is_file()


def _coarse_dataset(root: Path) -> Path:
    make_msd(root, 2)
    write_nifti(root / "imagesTr" / "c1.nii.gz", image_array(), _diag(30.0))
    write_nifti(root / "labelsTr" / "c1.nii.gz", label_array(), _diag(30.0))
    return root


def test_verify_plan_and_train_refuse_it_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _coarse_dataset(tmp_path / "ds")
    image = root / "imagesTr" / "c1.nii.gz"
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(tiny_plan()))  # target spacing (1.5, 1.25, 2): c1 becomes (200, 216, 120)
    assert cli(["verify", root], capsys).code == 0  # without a plan: the headers' limits only
    result = cli(["verify", root, "--plan", plan_path, "--max-resampled-voxels", "1000000"], capsys)
    assert_clean_failure(result, 3, [root], ["1 problem(s) in 1 of 2 cases"])
    assert (
        str(image) in result.err
        and "(200, 216, 120) = 5184000 voxels" in result.err
        and "--max-resampled-voxels" in result.err
    )
    assert cli(["verify", root, "--plan", plan_path], capsys).code == 0
    out = tmp_path / "plan_out.json"
    result = cli(["plan", root, "--out", out, "--max-resampled-voxels", "1000"], capsys)
    assert_clean_failure(
        result, 5, [root / "imagesTr"], ["too large once resampled", "--max-resampled-voxels"], outputs=[out]
    )
    # The windows of the planned patch over the coarse case are counted too (--max-windows).
    result = cli(["plan", root, "--out", out, "--max-windows", "1"], capsys)
    assert_clean_failure(result, 5, [root / "imagesTr"], ["too many sliding windows", "--max-windows"], outputs=[out])
    for command in (["plan", root, "--out", out, "--max-windows", "0"], ["verify", root, "--max-dim", "0"]):
        result = cli(command, capsys)  # the shared reading of the limit flags names the bad one
        assert_clean_failure(result, 2, [], [f"{command[-2]}: limit must be positive"], outputs=[out])
    assert cli(["plan", root, "--out", out], capsys).code == 0 and out.is_file()
    result = run_medgn(
        [
            "train",
            "--data",
            root,
            "--out",
            tmp_path / "run",
            "--plan",
            plan_path,
            "--fold",
            "all",
            "--device",
            "cpu",
            "--no-progress",
            "--max-resampled-voxels",
            "1000000",
        ]
    )
    assert_clean_failure(result, 5, [image], ["(200, 216, 120)", "--max-resampled-voxels"])
    assert not (tmp_path / "run" / "checkpoints").exists()
    # A validation case needing more windows than --max-windows (train has the flag it names).
    argv = ["train", "--data", root, "--out", tmp_path / "run_w", "--plan", plan_path, "--fold", "0"]
    result = cli([*argv, "--set", "plan.n_folds=2", "--device", "cpu", "--no-progress", "--max-windows", "1"], capsys)
    assert_clean_failure(result, 5, [], ["too many sliding windows", "--max-windows"])
    assert not (tmp_path / "run_w").exists()
    # --max-resampled-voxels is the config key data.limits.max_resampled_voxels (also in YAML).
    assert (
        load_run_config(None, ["data.limits.max_resampled_voxels=1000000"]).data.limits.max_resampled_voxels
        == 1_000_000
    )


def test_the_pipeline_checks_before_resampling(tmp_path: Path) -> None:
    from medgn.data.pipeline import val_transforms

    scan = write_nifti(tmp_path / "a.nii.gz", image_array(), _diag(30.0))
    label = write_nifti(tmp_path / "l.nii.gz", label_array(), _diag(30.0))
    from medgn.planning.plan import Plan

    transform = val_transforms(Plan.from_dict(tiny_plan()), Limits(max_resampled_voxels=1_000_000))
    with pytest.raises(MedgnError) as info:
        transform({"image": [str(scan)], "label": str(label)})
    assert info.value.code == 5 and str(scan) in str(info.value)
    with pytest.raises(MedgnError):
        check_workload(scan, (10, 9, 8), _diag(30.0), SPACING, Limits(max_resampled_voxels=1_000_000))
