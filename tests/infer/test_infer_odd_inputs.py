"""Folder inference over entries that are not plain scans: links that lead nowhere, FIFOs, two files
for one named channel, shard reports named like cases, odd --channels and torchrun variables, and the
class-to-label map stored with saved probabilities."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import _infer_fixtures as F
import nibabel as nib
import numpy as np
import pytest

from medgn.cli import main
from medgn.errors import UsageError
from medgn.infer.outputs import output_names, parse_shard
from medgn.infer.predictor import Predictor
from medgn.infer.run import infer

AFFINE = F.axis_affines()[0]


def _predictor(in_channels: int = 1) -> Predictor:
    return Predictor.from_modules([F.ThresholdNet()], F.plan(in_channels=in_channels))


def test_a_dangling_link_and_a_fifo_named_as_scans_fail_as_cases_without_blocking(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    F.write_image(src / "a.nii.gz", F.image(), AFFINE)
    (src / "b.nii.gz").symlink_to(tmp_path / "gone" / "b.nii.gz")
    os.mkfifo(src / "c.nii.gz")  # opened for reading, it would block until a writer came
    report = infer(_predictor(), src, tmp_path / "out")
    status = {c.case_id: (c.status, c.code) for c in report.cases}
    assert status == {"a": ("ok", None), "b": ("failed", 3), "c": ("failed", 3)}
    assert report.exit_code == 3
    messages = {c["case_id"]: c["message"] for c in json.loads((tmp_path / "out" / "report.json").read_text())["cases"]}
    assert "symbolic link that leads nowhere" in messages["b"] and "b.nii.gz" in messages["b"]
    assert "FIFO" in messages["c"] and "c.nii.gz" in messages["c"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.json", "a.nii.gz", "report.json"]


def test_two_files_for_one_named_channel_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    F.write_image(src / "p1_t1.nii.gz", F.image(), AFFINE)
    F.write_image(src / "p1_t1.nii", F.image(), AFFINE)
    with pytest.raises(Exception, match=r"two files for one channel: p1_t1\.nii, p1_t1\.nii\.gz"):
        infer(_predictor(), src, tmp_path / "out", channels=["t1"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("channels", [",", "t1,", "t1,,flair", "t1,t1"])
def test_empty_or_repeated_channel_names_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], channels: str
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    F.write_image(src / "p1_t1.nii.gz", F.image(), AFFINE)
    run = F.save_run(tmp_path / "run")
    args = ["infer", "--model", str(run), "--input", str(src), "--output", str(tmp_path / "out"), "--channels"]
    assert main([*args, channels]) == 2
    err = capsys.readouterr().err
    assert "--channels: channel names must be distinct and not empty" in err and len(err.strip().splitlines()) == 1


def test_a_case_named_like_a_shard_report_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    # Case "report-1of2" falls in shard 0 (sorted first) and would overwrite or be overwritten by the
    # report of shard 1, which shares the folder.
    assert output_names(["report-1of2", "x"], {}, None) == {"report-1of2": "report-1of2", "x": "x"}
    for shard in ((0, 2), (1, 2)):
        with pytest.raises(UsageError, match="shard's run report -> report-1of2.json"):
            output_names(["report-1of2", "x"], {}, shard)
    assert output_names(["report-5of2", "report-1of3"], {}, (0, 2))  # no shard of this run writes them
    src = tmp_path / "in"
    src.mkdir()
    for name in ("report-0of2", "zz"):
        F.write_image(src / f"{name}.nii.gz", F.image(), AFFINE)
    with pytest.raises(UsageError, match="report-0of2.json"):
        infer(_predictor(), src, tmp_path / "out", shard="0/2")
    assert not (tmp_path / "out").exists()


def test_bad_torchrun_variables_name_them_not_the_shard_option() -> None:
    with pytest.raises(UsageError) as bad:
        parse_shard(None, env={"RANK": "abc", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert bad.value.one_line().startswith("RANK/WORLD_SIZE:")
    with pytest.raises(UsageError) as out_of_range:
        parse_shard(None, env={"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert out_of_range.value.one_line().startswith("RANK/WORLD_SIZE:")
    with pytest.raises(UsageError) as given:
        parse_shard("x", env={"RANK": "0", "WORLD_SIZE": "2"})
    assert given.value.one_line().startswith("--shard:")


def test_saved_probabilities_carry_the_label_value_of_every_class(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    F.write_image(src / "a.nii.gz", F.image(), AFFINE)
    plan = F.plan()
    plan["label_values"] = [0, 5]  # class 1 is written as label 5
    predictor = Predictor.from_modules([F.ThresholdNet()], plan)
    assert infer(predictor, src, tmp_path / "out", save_probabilities=True).exit_code == 0
    with np.load(tmp_path / "out" / "a_probabilities.npz") as saved:
        assert saved["label_values"].tolist() == [0, 5]
        labels = saved["label_values"][saved["probabilities"].argmax(0)]
    mask = np.asanyarray(nib.load(tmp_path / "out" / "a.nii.gz").dataobj)
    assert np.array_equal(labels, mask) and (mask == 5).any()


def test_the_axis_limit_the_error_names_is_a_flag_of_infer_and_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    F.write_image(src / "long.nii.gz", np.zeros((40, 4, 4), np.float32), AFFINE)
    run = F.save_run(tmp_path / "run")
    args = ["infer", "--model", str(run), "--input", str(src / "long.nii.gz"), "--output"]
    assert main([*args, str(tmp_path / "a.nii.gz"), "--max-dim", "20"]) == 5
    assert "raise it with --max-dim" in capsys.readouterr().err
    assert main([*args, str(tmp_path / "b.nii.gz"), "--max-dim", "40", "--no-tta"]) == 0
    with pytest.raises(SystemExit) as shown:
        main(["plan", "--help"])
    assert shown.value.code == 0 and "--max-dim" in capsys.readouterr().out


def _named_predictor(names: list[str]) -> Predictor:
    plan = F.plan(in_channels=len(names))
    plan["dataset"] = {"name": "d", "format": "nnunet", "channel_names": names}
    return Predictor.from_modules([F.ThresholdNet()], plan)


def test_channels_named_in_another_order_than_the_models_are_refused(tmp_path: Path) -> None:
    # Swapped --channels, or a dataset.json naming the channels in another order, fed FLAIR where the
    # model expects T1c: a wrong mask, exit 0, no warning.
    from medgn.errors import InputDataError
    from tests.data.conftest import make_nnunet

    src = tmp_path / "in"
    src.mkdir()
    for channel in ("FLAIR", "T1c"):
        F.write_image(src / f"p1_{channel}.nii.gz", F.image(), AFFINE)
    predictor = _named_predictor(["FLAIR", "T1c"])
    with pytest.raises(UsageError, match="--channels: names the model's channels in another order: T1c, FLAIR"):
        infer(predictor, src, tmp_path / "o1", channels=["T1c", "FLAIR"])
    assert not (tmp_path / "o1").exists()
    assert infer(predictor, src, tmp_path / "o2", channels=["FLAIR", "T1c"]).exit_code == 0
    dataset = make_nnunet(tmp_path / "ds", n_cases=1, channels=2)  # channel_names CT, T2
    (dataset / "imagesTs").mkdir()
    for c in range(2):
        F.write_image(dataset / "imagesTs" / f"t1_{c:04d}.nii.gz", F.image(), AFFINE)
    with pytest.raises(InputDataError, match="dataset.json: names the model's channels in another order: CT, T2"):
        infer(_named_predictor(["T2", "CT"]), dataset, tmp_path / "o3")
    assert infer(_named_predictor(["CT", "T2"]), dataset, tmp_path / "o4").exit_code == 0


def test_a_case_missing_a_channel_file_fails_alone_naming_the_file(tmp_path: Path) -> None:
    # A case with only _0001, or _0000 and _0002, stopped the whole folder; a lone _0000 was read as
    # a 4D file "with 1 channel on its 4th axis".
    src = tmp_path / "in"
    src.mkdir()
    for name in ("c8_0000", "c8_0001", "c9_0001", "cc_0000", "cc_0002", "cd_0000", "ce_0000", "ce_0001", "ce_0003"):
        F.write_image(src / f"{name}.nii.gz", F.image(), AFFINE)
    report = infer(_predictor(in_channels=2), src, tmp_path / "out")
    status = {c.case_id: (c.status, c.code) for c in report.cases}
    assert status == {
        "c8": ("ok", None),
        "c9": ("failed", 3),
        "cc": ("failed", 3),
        "cd": ("failed", 3),
        "ce": ("failed", 3),
    }
    messages = {c["case_id"]: c["message"] for c in json.loads((tmp_path / "out" / "report.json").read_text())["cases"]}
    assert messages["c9"].startswith(f"{src / 'c9_0000'}: channel file missing")
    assert messages["cc"].startswith(f"{src / 'cc_0001'}: channel file missing")
    assert messages["cd"].startswith(f"{src / 'cd_0001'}: channel file missing (got only cd_0000.nii.gz")
    # _0000 and _0001 there for a 2-channel model: _0003 is one too many, not _0002 missing
    assert messages["ce"].startswith(f"{src / 'ce_0003.nii.gz'}: case has channel files the model does not take")


def test_a_4d_scan_keeps_to_the_size_limits(tmp_path: Path) -> None:
    # A 4D file of every channel was read with the default limits whatever --max-voxels said.
    import nibabel as nib

    from medgn.data.preflight import DEFAULT_LIMITS

    image = np.stack([F.image(), F.image(1)], axis=-1)
    nib.save(nib.Nifti1Image(image, AFFINE), str(tmp_path / "m8.nii.gz"))
    small = dataclasses.replace(DEFAULT_LIMITS, max_voxels=100)
    report = infer(_predictor(in_channels=2), tmp_path / "m8.nii.gz", tmp_path / "out", limits=small)
    (case,) = report.cases
    assert (case.status, case.code) == ("failed", 5) and "too many voxels" in case.message


def test_a_dataset_folder_of_test_cases_only_is_read(tmp_path: Path) -> None:
    # dataset.json and imagesTs as distributed for testing: refused for lacking imagesTr and labelsTr.
    from medgn.data.datasets import load_dataset
    from medgn.errors import InputDataError

    root = tmp_path / "ds"
    (root / "imagesTs").mkdir(parents=True)
    desc = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "organ": 1},
        "numTraining": 0,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(desc))
    F.write_image(root / "imagesTs" / "t1_0000.nii.gz", F.image(), AFFINE)
    report = infer(_predictor(), root, tmp_path / "out")
    assert [(c.case_id, c.status) for c in report.cases] == [("t1", "ok")]
    with pytest.raises(InputDataError, match="folder missing: .*imagesTr"):  # training still needs them
        load_dataset(root)


def test_a_4d_scan_named_like_a_channel_file_is_still_read_as_one(tmp_path: Path) -> None:
    # The lone-_0000 rule is for 3D files: a 4D file of every channel may carry the suffix too.
    import nibabel as nib

    image = np.stack([F.image(), F.image(1)], axis=-1)
    nib.save(nib.Nifti1Image(image, AFFINE), str(tmp_path / "BRATS_001_0000.nii.gz"))
    report = infer(_predictor(in_channels=2), tmp_path / "BRATS_001_0000.nii.gz", tmp_path / "out")
    assert [(c.case_id, c.status) for c in report.cases] == [("BRATS_001_0000", "ok")]


def test_a_dataset_test_case_missing_a_channel_fails_alone(tmp_path: Path) -> None:
    # In a dataset folder, a_0000 + a_0002 fed a_0002 as channel 1 (exit 0), and b_0001 alone was
    # reported as "b_0001 missing".
    from tests.data.conftest import make_nnunet

    dataset = make_nnunet(tmp_path / "ds", n_cases=1, channels=2)
    (dataset / "imagesTs").mkdir()
    for name in ("a_0000", "a_0002", "b_0001", "c_0000", "c_0001"):
        F.write_image(dataset / "imagesTs" / f"{name}.nii.gz", F.image(), AFFINE)
    report = infer(_predictor(in_channels=2), dataset, tmp_path / "out")
    status = {c.case_id: (c.status, c.message) for c in report.cases}
    assert status["c"][0] == "ok"
    assert status["a"][0] == "failed" and status["a"][1].startswith(
        f"{dataset / 'imagesTs' / 'a_0001.nii.gz'}: channel file missing"
    )
    assert status["b"][0] == "failed" and status["b"][1].startswith(
        f"{dataset / 'imagesTs' / 'b_0000.nii.gz'}: channel file missing"
    )


def test_verify_and_infer_name_a_test_cases_missing_and_extra_channel_files(tmp_path: Path, capsys) -> None:
    # verify --test showed the placeholder "t2_0001.nii.gz (missing): file not found" and passed a case
    # with an extra _0002; a 3-channel dataset's case with _0000, _0001 for a 2-channel model failed.
    from tests.data.conftest import make_nnunet

    dataset = make_nnunet(tmp_path / "ds", n_cases=2, channels=2)
    (dataset / "imagesTs").mkdir()
    for name in ("t1_0000", "t1_0001", "t2_0000", "t3_0000", "t3_0001", "t3_0002"):
        F.write_image(dataset / "imagesTs" / f"{name}.nii.gz", F.image(), AFFINE)
    assert main(["verify", str(dataset), "--test"]) == 3
    err = capsys.readouterr().err
    assert f"channel file missing: {dataset / 'imagesTs' / 't2_0001.nii.gz'}" in err and "(missing)" not in err
    assert "unexpected channel file (only 2 channels declared): t3_0002.nii.gz" in err
    three = make_nnunet(tmp_path / "ds3", n_cases=1, channels=3)
    (three / "imagesTs").mkdir()
    for name in ("u1_0000", "u1_0001"):
        F.write_image(three / "imagesTs" / f"{name}.nii.gz", F.image(), AFFINE)
    report = infer(_predictor(in_channels=2), three, tmp_path / "out")
    assert [(c.case_id, c.status) for c in report.cases] == [("u1", "ok")]


def test_verify_test_names_a_constant_extra_channel_file_without_an_internal_error(tmp_path: Path, capsys) -> None:
    import numpy as np

    from tests.data.conftest import make_nnunet

    dataset = make_nnunet(tmp_path / "ds", n_cases=2, channels=2)
    (dataset / "imagesTs").mkdir()
    for name in ("t3_0000", "t3_0001"):
        F.write_image(dataset / "imagesTs" / f"{name}.nii.gz", F.image(), AFFINE)
    F.write_image(dataset / "imagesTs" / "t3_0002.nii.gz", np.zeros_like(F.image()), AFFINE)  # constant: a note
    assert main(["verify", str(dataset), "--test"]) == 3
    assert "unexpected channel file (only 2 channels declared): t3_0002.nii.gz" in capsys.readouterr().err
