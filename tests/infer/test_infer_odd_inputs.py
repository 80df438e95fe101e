"""Folder inference over entries that are not plain scans: links that lead nowhere, FIFOs, two files
for one named channel, shard reports named like cases, odd --channels and torchrun variables, and the
class-to-label map stored with saved probabilities."""

from __future__ import annotations

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
