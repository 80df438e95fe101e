"""Tests for dataset discovery (MSD, nnU-Net v2, folders), find_inputs and `medgn verify`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from medgn.cli import main
from medgn.data.datasets import load_dataset
from medgn.data.inputs import find_inputs
from medgn.errors import InputDataError
from tests.data.conftest import make_nifti, make_nnunet, mini_msd


def _verify(root: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    before = sorted(str(p) for p in root.rglob("*"))
    code = main(["verify", str(root)])
    err = capsys.readouterr().err
    assert sorted(str(p) for p in root.rglob("*")) == before  # verify writes nothing
    return code, err


def test_nnunet_dataset_loads_and_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_nnunet(tmp_path / "ds")
    index = load_dataset(root)
    assert (index.format, index.name, index.channel_names, index.modalities) == (
        "nnunet",
        "tiny",
        ("CT", "T2"),
        ("CT", "MR"),
    )
    assert index.labels == {"background": 0, "a": 1, "b": 2}
    assert [c.case_id for c in index.cases] == ["case0", "case1"]
    assert [p.name for p in index.cases[1].images] == ["case1_0000.nii.gz", "case1_0001.nii.gz"]
    assert _verify(root, capsys)[0] == 0


def test_dataset_json_problems_are_all_listed(tmp_path: Path) -> None:
    root = make_nnunet(tmp_path / "ds", n_cases=3)
    (root / "imagesTr" / "case1_0001.nii.gz").unlink()
    (root / "labelsTr" / "case2.nii.gz").unlink()
    desc = json.loads((root / "dataset.json").read_text())
    desc["numTraining"] = 5
    desc["labels"] = {"background": 0, "a": 1, "b": 3}
    (root / "dataset.json").write_text(json.dumps(desc))
    with pytest.raises(InputDataError) as info:
        load_dataset(root)
    text = str(info.value)
    assert "dataset.json" in text and "4 problem(s)" in text
    for words in ("consecutive", "case1_0001.nii.gz", "label missing for case case2", "numTraining is 5"):
        assert words in text
    del desc["file_ending"], desc["channel_names"]
    (root / "dataset.json").write_text(json.dumps(desc))
    assert "missing key 'channel_names'" in str(pytest.raises(InputDataError, load_dataset, root).value)


def test_msd_layout_and_escaping_paths(tmp_path: Path) -> None:
    root = tmp_path / "msd"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    make_nifti(root / "imagesTr" / "a.nii.gz", np.ones((4, 4, 4), np.float32))
    make_nifti(root / "labelsTr" / "a.nii.gz", np.zeros((4, 4, 4), np.uint8))
    desc = {
        "name": "m",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "x"},
        "numTraining": 1,
        "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}],
    }
    (root / "dataset.json").write_text(json.dumps(desc))
    index = load_dataset(root)
    assert (index.format, index.modalities, index.labels, index.cases[0].case_id) == (
        "msd",
        ("MR",),
        {"background": 0, "x": 1},
        "a",
    )
    desc["training"].append({"image": "../../etc/x.nii.gz", "label": "/abs/y.nii.gz"})
    desc["numTraining"] = 2
    (root / "dataset.json").write_text(json.dumps(desc))
    text = str(pytest.raises(InputDataError, load_dataset, root).value)
    assert "leaves the dataset folder: '../../etc/x.nii.gz'" in text and "'/abs/y.nii.gz'" in text


def test_folder_pair_with_odd_names(tmp_path: Path) -> None:
    root = tmp_path / "pair"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name in ("-lead ing", "ünï $x"):
        make_nifti(root / "images" / f"{name}.nii.gz", np.ones((4, 4, 4), np.float32))
        make_nifti(root / "labels" / f"{name}.nii.gz", np.zeros((4, 4, 4), np.uint8))
    index = load_dataset(root)
    assert [c.case_id for c in index.cases] == ["-lead ing", "ünï $x"]
    assert index.format == "folders" and index.cases[0].label == root / "labels" / "-lead ing.nii.gz"


def test_folder_pair_cases_named_like_channels_follow_their_labels(tmp_path: Path) -> None:
    root = tmp_path / "pair"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in (1, 2, 3):  # patient_0001 ... : case names, each with its own label
        make_nifti(root / "images" / f"patient_{i:04d}.nii.gz", np.ones((4, 4, 4), np.float32))
        make_nifti(root / "labels" / f"patient_{i:04d}.nii.gz", np.zeros((4, 4, 4), np.uint8))
    index = load_dataset(root)
    assert [c.case_id for c in index.cases] == ["patient_0001", "patient_0002", "patient_0003"]
    assert all(len(c.images) == 1 for c in index.cases) and index.channel_names == ("channel0",)
    # two channels of one case (labels/ct.nii.gz for images/ct_0000 and ct_0001) stay grouped
    multi = tmp_path / "multi"
    (multi / "images").mkdir(parents=True)
    (multi / "labels").mkdir()
    for c in (0, 1):
        make_nifti(multi / "images" / f"ct_{c:04d}.nii.gz", np.ones((4, 4, 4), np.float32))
    make_nifti(multi / "labels" / "ct.nii.gz", np.zeros((4, 4, 4), np.uint8))
    index = load_dataset(multi)
    assert [c.case_id for c in index.cases] == ["ct"] and len(index.cases[0].images) == 2


@pytest.mark.parametrize("broken", ["label_spacing", "channel_origin", "label_values", "nan"])
def test_verify_reports_every_problem_with_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], broken: str
) -> None:
    root = make_nnunet(tmp_path / "ds")
    label = root / "labelsTr" / "case1.nii.gz"
    channel = root / "imagesTr" / "case1_0001.nii.gz"
    if broken == "label_spacing":
        make_nifti(label, np.zeros((6, 5, 4), np.uint8), spacing=(1.0, 1.0, 2.5))
        words, bad = ["spacing (1, 1, 2) vs (1, 1, 2.5)", str(label), "case1_0000.nii.gz"], label
    elif broken == "channel_origin":
        affine = np.diag([1.0, 1.0, 2.0, 1.0])
        affine[:3, 3] = [0.0, 5.0, 0.0]
        make_nifti(channel, np.ones((6, 5, 4), np.float32), affine)
        words, bad = ["origin (0, 0, 0) vs (0, 5, 0)", str(channel)], channel
    elif broken == "label_values":
        make_nifti(label, np.full((6, 5, 4), 7, np.uint8), spacing=(1.0, 1.0, 2.0))
        words, bad = ["outside the declared set: [7]", "[0, 1, 2]"], label
    else:
        array = np.ones((6, 5, 4), np.float32)
        array[0, 0, :2] = np.nan
        make_nifti(channel, array, spacing=(1.0, 1.0, 2.0))
        words, bad = ["2 NaN/Inf voxels"], channel
    (root / "imagesTr" / "case0_0000.nii.gz").write_bytes(b"")  # a second problem in another case
    code, err = _verify(root, capsys)
    assert code == 3
    lines = err.strip().splitlines()
    assert lines[-1].startswith("medgn: error: ") and "2 problem(s) in 2 of 2 cases" in lines[-1]
    problem_lines = [line for line in lines if line.startswith("problem: ")]
    assert any("case0_0000.nii.gz: file is empty" in line for line in problem_lines)
    assert any(str(bad) in line and all(w in line for w in words) for line in problem_lines), problem_lines


def test_find_inputs(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("b_0000", "b_0001", "a_0000", "a_0001"):
        make_nifti(folder / f"{name}.nii.gz", np.ones((3, 3, 3), np.float32))
    cases = find_inputs(folder, channels=2)
    assert [(c.case_id, [p.name for p in c.images]) for c in cases] == [
        ("a", ["a_0000.nii.gz", "a_0001.nii.gz"]),
        ("b", ["b_0000.nii.gz", "b_0001.nii.gz"]),
    ]
    with pytest.raises(InputDataError, match="wrong number of channels"):
        find_inputs(folder, channels=1)
    single = find_inputs(folder / "a_0000.nii.gz")
    assert single[0].case_id == "a_0000" and single[0].label is None
    ds = make_nnunet(tmp_path / "ds")
    (ds / "imagesTs").mkdir()
    os.symlink(ds / "imagesTr" / "case0_0000.nii.gz", ds / "imagesTs" / "t_0000.nii.gz")
    os.symlink(ds / "imagesTr" / "case0_0001.nii.gz", ds / "imagesTs" / "t_0001.nii.gz")
    assert [c.case_id for c in find_inputs(ds, channels=2)] == ["t"]


@pytest.mark.data
def test_real_datasets_verify(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = mini_msd(shared_data / "LA2018", tmp_path / "la", 3)
    assert main(["verify", str(root)]) == 0
    assert "all 3 cases passed" in capsys.readouterr().out
    index = load_dataset(shared_data / "BraTS2013mini")
    assert index.channel_names == ("FLAIR", "T1c") and index.labels["enhancing_tumor"] == 4 and len(index.cases) == 4
    assert main(["verify", str(shared_data / "BraTS2013mini")]) == 0
    assert "all 4 cases passed" in capsys.readouterr().out


def test_require_valid_lists_all_problems(tmp_path: Path) -> None:
    from medgn.data.verify import require_valid

    root = make_nnunet(tmp_path / "ds")
    assert require_valid(load_dataset(root)).ok
    (root / "labelsTr" / "case0.nii.gz").write_bytes(b"junk")
    (root / "imagesTr" / "case1_0001.nii.gz").write_bytes(b"")
    text = str(pytest.raises(InputDataError, require_valid, load_dataset(root)).value)
    assert "2 problem(s)" in text and "case0.nii.gz" in text and "case1_0001.nii.gz: file is empty" in text


def test_an_inference_folder_of_numbered_scans_says_how_it_reads_them(tmp_path: Path) -> None:
    for i in (1, 2):
        make_nifti(tmp_path / f"patient_{i:04d}.nii.gz", np.ones((4, 4, 4), np.float32))
    with pytest.raises(InputDataError, match=r"case patient has channels \[1, 2\]") as info:
        find_inputs(tmp_path)
    assert "rename single-channel scans such as patient_0001" in info.value.one_line()
    (case,) = find_inputs(tmp_path / "patient_0001.nii.gz")  # one file at a time: the whole name
    assert case.case_id == "patient_0001"


def test_verify_names_a_fifo_and_a_dangling_link_instead_of_dropping_or_opening_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A label link that leads nowhere is named as such, and a FIFO named as a channel (opened, it
    would block) is a problem of its case rather than a channel left out of the dataset unseen."""
    root = make_nnunet(tmp_path / "ds")
    channel = root / "imagesTr" / "case0_0001.nii.gz"
    channel.unlink()
    os.mkfifo(channel)
    label = root / "labelsTr" / "case1.nii.gz"
    label.unlink()
    label.symlink_to(tmp_path / "gone.nii.gz")
    with pytest.raises(InputDataError, match="label is a symbolic link that leads nowhere for case case1"):
        load_dataset(root)
    label.unlink()
    make_nifti(label, np.zeros((6, 5, 4), np.uint8), spacing=(1.0, 1.0, 2.0))
    assert [p.name for p in load_dataset(root).cases[0].images] == ["case0_0000.nii.gz", "case0_0001.nii.gz"]
    code, err = _verify(root, capsys)
    assert code == 3
    problems = [line for line in err.splitlines() if line.startswith("problem: ")]
    assert any(str(channel) in line and "a FIFO, socket or device" in line for line in problems), problems
