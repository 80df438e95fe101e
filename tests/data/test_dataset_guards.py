"""Tests for the dataset guards: case ids (unique, plain names), region-based labels, classes that no
label holds, and the one-line messages of ``dataset.json`` problems and of ``medgn verify``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medgn.cli import main
from medgn.data.datasets import load_dataset
from medgn.data.inputs import find_inputs
from medgn.data.verify import verify_dataset
from medgn.errors import InputDataError
from medgn.logs import detach_file_logs
from medgn.planning.fingerprint import compute_fingerprint
from tests.data.conftest import make_nifti, make_nnunet

SHAPE = (6, 5, 4)


def _label(value: int = 1) -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    label[1:4, 1:4, 1:3] = value
    return label


def _image(seed: int, channels: int | None = None) -> np.ndarray:
    image = np.random.default_rng(seed).normal(size=SHAPE).astype(np.float32)
    return image if channels is None else np.stack([image + c for c in range(channels)], axis=-1)


def _msd(root: Path, n: int = 3, **desc: Any) -> Path:
    """An MSD dataset of ``n`` tiny cases c0, c1... (label 1 in a block); ``desc`` overrides keys."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i in range(n):
        make_nifti(root / "imagesTr" / f"c{i}.nii.gz", _image(i))
        make_nifti(root / "labelsTr" / f"c{i}.nii.gz", _label())
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    base = {
        "name": "tiny",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "cube"},
        "numTraining": n,
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps({**base, **desc}))
    return root


def _edit(root: Path, **changes: Any) -> None:
    desc = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**desc, **changes}))


def _run(argv: list[Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    finally:
        detach_file_logs()
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _description_problem(root: Path) -> str:
    with pytest.raises(InputDataError) as info:
        load_dataset(root)
    assert info.value.code == 3
    return str(info.value)


# --- case ids ---------------------------------------------------------------------------------


def test_msd_same_file_name_in_two_folders_is_one_case_id_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _msd(tmp_path / "ds", 3)
    (root / "imagesTr" / "sub").mkdir()
    shutil.copy(root / "imagesTr" / "c1.nii.gz", root / "imagesTr" / "sub" / "c0.nii.gz")
    desc = json.loads((root / "dataset.json").read_text())
    desc["training"][1]["image"] = "./imagesTr/sub/c0.nii.gz"
    (root / "dataset.json").write_text(json.dumps(desc))
    code, _, err = _run(["verify", root], capsys)
    assert code == 3
    assert "training[0] ('./imagesTr/c0.nii.gz') and training[1] ('./imagesTr/sub/c0.nii.gz')" in err
    assert "same case id 'c0'" in err and len(err.strip().splitlines()) == 1


def test_msd_image_listed_twice_with_two_labels_is_refused(tmp_path: Path) -> None:
    root = _msd(tmp_path / "ds", 3)
    desc = json.loads((root / "dataset.json").read_text())
    desc["training"][2]["image"] = "./imagesTr/c0.nii.gz"  # c0's image with c2's label
    (root / "dataset.json").write_text(json.dumps(desc))
    text = _description_problem(root)
    assert "training[0]" in text and "training[2]" in text and "'c0'" in text


def test_msd_test_list_with_one_case_id_twice_is_refused(tmp_path: Path) -> None:
    root = _msd(tmp_path / "ds", 2)
    (root / "imagesTs" / "b").mkdir(parents=True)
    for rel in ("imagesTs/t.nii.gz", "imagesTs/b/t.nii.gz"):
        make_nifti(root / rel, _image(5))
    _edit(root, test=["./imagesTs/t.nii.gz", "./imagesTs/b/t.nii.gz"])
    with pytest.raises(InputDataError, match=r"test\[0\] .* and test\[1\] .* same case id 't'"):
        find_inputs(root)


@pytest.mark.parametrize(("name", "case_id"), [("...nii.gz", ".."), (".nii.gz", ".nii"), (".hidden.nii.gz", ".hidden")])
def test_msd_case_ids_that_are_no_plain_names_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, case_id: str
) -> None:
    root = _msd(tmp_path / "ds", 3)
    (root / "imagesTr" / "c1.nii.gz").rename(root / "imagesTr" / name)
    desc = json.loads((root / "dataset.json").read_text())
    desc["training"][1]["image"] = f"./imagesTr/{name}"
    (root / "dataset.json").write_text(json.dumps(desc))
    code, _, err = _run(["verify", root], capsys)
    assert code == 3
    assert f"training[1] image './imagesTr/{name}'" in err and repr(case_id) in err
    # The test list of an MSD dataset (what 'medgn infer' reads from it) goes through the same check.
    _edit(root, training=desc["training"][:1] + desc["training"][2:], numTraining=2, test=[f"./imagesTr/{name}"])
    with pytest.raises(InputDataError, match=r"test\[0\] image"):
        find_inputs(root)


def test_folder_layout_refuses_a_case_and_its_channel_file_side_by_side(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name in ("c0.nii.gz", "c0_0000.nii.gz", "c1.nii.gz"):
        make_nifti(root / "images" / name, _image(0))
    for name in ("c0.nii.gz", "c1.nii.gz"):
        make_nifti(root / "labels" / name, _label())
    text = _description_problem(root)
    assert "two sets of image files for case 'c0'" in text and "c0_0000.nii.gz" in text


# --- region-based labels ------------------------------------------------------------------------


def _regions(tmp_path: Path) -> Path:
    root = make_nnunet(tmp_path / "ds", n_cases=2, channels=1)
    desc = json.loads((root / "dataset.json").read_text())
    desc["labels"] = {"background": 0, "whole": [1, 2], "core": 2}
    desc["regions_class_order"] = [1, 2]
    (root / "dataset.json").write_text(json.dumps(desc))
    return root


def test_region_based_labels_are_refused_for_training_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _regions(tmp_path)
    code, _, err = _run(["verify", root], capsys)
    assert code == 3 and len(err.strip().splitlines()) == 1  # one error on dataset.json, not one per case
    assert str(root / "dataset.json") in err and "region-based labels ('whole': [1, 2])" in err
    assert "not supported for training" in err and "outside the declared set" not in err
    code, _, err = _run(["plan", root, "--out", tmp_path / "plan" / "plan.json"], capsys)
    assert code == 3 and "region-based labels" in err and not (tmp_path / "plan").exists()
    with pytest.raises(InputDataError, match="region-based"):
        compute_fingerprint(load_dataset(root))
    # Evaluation still reads the regions of the same dataset.json.
    assert load_dataset(root).regions["regions"] == {"whole": [1, 2]}


def test_train_refuses_region_based_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _regions(tmp_path)
    code, _, err = _run(
        ["train", "--data", root, "--out", tmp_path / "run", "--device", "cpu", "--no-progress"], capsys
    )
    assert code == 3 and "region-based labels" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_nnunet_ignore_label_is_refused_for_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """nnU-Net's 'ignore' label marks unannotated voxels: trained as a class, the network predicted it."""
    root = make_nnunet(tmp_path / "ds", n_cases=2, channels=1)
    _edit(root, labels={"background": 0, "cube": 1, "ignore": 2})
    for argv in (["verify", root], ["plan", root, "--out", tmp_path / "plan.json"]):
        code, _, err = _run(argv, capsys)
        assert code == 3 and len(err.strip().splitlines()) == 1, err
        assert str(root / "dataset.json") in err and "the 'ignore' label (value 2" in err
    code, _, err = _run(
        ["train", "--data", root, "--out", tmp_path / "run", "--device", "cpu", "--no-progress"], capsys
    )
    assert code == 3 and "'ignore' label" in err and not (tmp_path / "run" / "checkpoints").exists()


def test_dataset_json_variants_other_tools_write_are_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """nnU-Net label values as strings ("1", read with int() there), MONAI's test entries as objects."""
    root = make_nnunet(tmp_path / "nn", n_cases=2, channels=1)
    _edit(root, labels={"background": "0", "cube": "1"})
    assert load_dataset(root).labels == {"background": 0, "cube": 1}
    _edit(root, labels={"background": 0, "cube": "one"})
    assert "label 'cube' has a non-integer value 'one'" in _description_problem(root)
    _edit(root, labels={"background": 0, "cube": 1}, dataset={"case0": {"images": ["a.nii.gz"], "label": "b.nii.gz"}})
    assert "the 'dataset' key (explicit file lists) is not supported" in _description_problem(root)
    msd = _msd(tmp_path / "msd", 2, test=[{"image": "./imagesTr/c0.nii.gz"}, "./imagesTr/c1.nii.gz"])
    assert [c.case_id for c in load_dataset(msd).test_cases] == ["c0", "c1"]
    _edit(msd, test=[{"label": "./x.nii.gz"}])
    text = _description_problem(msd)
    assert "1 problem(s)" in text and "test[0] is not a path or an object with an 'image' path" in text


# --- classes that no label holds ----------------------------------------------------------------


def test_no_foreground_in_any_label_is_a_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _msd(tmp_path / "ds", 3)
    for i in range(3):
        make_nifti(root / "labelsTr" / f"c{i}.nii.gz", np.zeros(SHAPE, np.uint8))
    report = verify_dataset(load_dataset(root), warn=None)
    assert not report.ok and all(c.ok for c in report.cases)
    assert len(report.dataset_problems) == 1 and "no training label holds any foreground" in report.problems[-1]
    code, _, err = _run(["verify", root], capsys)
    assert code == 3 and "problem: " + str(root / "dataset.json") in err and "as a whole" in err
    code, _, err = _run(["plan", root, "--out", tmp_path / "p" / "plan.json"], capsys)
    assert code == 3 and "no training label holds any foreground" in err
    code, _, err = _run(
        ["train", "--data", root, "--out", tmp_path / "run", "--device", "cpu", "--no-progress"], capsys
    )
    assert code == 3 and "no training label holds any foreground" in err


def test_declared_class_in_no_label_is_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _msd(tmp_path / "ds", 3, labels={"0": "background", "1": "cube", "2": "never", "3": "rare"})
    make_nifti(root / "labelsTr" / "c2.nii.gz", _label(3))
    code, out, err = _run(["verify", root], capsys)
    assert code == 0 and "all 3 cases passed (1 warning(s) above)" in out
    warnings = [line for line in err.splitlines() if line.startswith("medgn: warning:")]
    assert len(warnings) == 1 and "'never' (2)" in warnings[0] and "'rare'" not in warnings[0]
    assert "Dice 0" in warnings[0]
    # The check training runs prints it on stderr too (it calls verify_dataset with the default warn).
    report = verify_dataset(load_dataset(root))
    assert report.ok and len(report.warnings) == 1
    assert capsys.readouterr().err == f"medgn: warning: {report.warnings[0]}\n"
    code, _, err = _run(["plan", root, "--out", tmp_path / "p" / "plan.json"], capsys)
    assert code == 0 and "medgn: warning:" in err and "'never' (2)" in err


def test_verify_counts_every_warning_and_shows_names_as_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A dataset name with "[/red]" was read as console markup (internal error, exit 1); the summary
    # counted the declared-class warning but not the numTraining one printed before it; the title
    # counted training cases beside rows of test cases too; long ids lost their middle.
    long_id = "patient_" + "abcdefghij" * 12
    root = _msd(tmp_path / "ds", 3, labels={"0": "background", "1": "cube", "2": "never"})
    desc = json.loads((root / "dataset.json").read_text())
    desc.update(name="LA [/red] copy", numTraining=80)
    make_nifti(root / "imagesTr" / f"{long_id}.nii.gz", _image(5))
    make_nifti(root / "labelsTr" / f"{long_id}.nii.gz", _label())
    desc["training"].append({"image": f"./imagesTr/{long_id}.nii.gz", "label": f"./labelsTr/{long_id}.nii.gz"})
    (root / "imagesTs").mkdir()
    make_nifti(root / "imagesTs" / "t0.nii.gz", _image(6))
    desc["test"] = ["./imagesTs/t0.nii.gz"]
    (root / "dataset.json").write_text(json.dumps(desc))
    code, out, err = _run(["verify", root, "--test"], capsys)
    warnings = [line for line in err.splitlines() if line.startswith("medgn: warning:")]
    assert code == 0 and len(warnings) == 2, err
    assert "LA [/red] copy (msd, 4 training, 1 test cases" in out
    assert "all 5 cases passed (2 warning(s) above)" in out
    first_cells = "".join(line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│"))
    assert long_id in first_cells, out


def test_unreadable_label_leaves_class_presence_unjudged(tmp_path: Path) -> None:
    root = _msd(tmp_path / "ds", 2, labels={"0": "background", "1": "cube", "2": "b"})
    (root / "labelsTr" / "c1.nii.gz").write_bytes(b"")  # c1 might hold class 2: only its problem is listed
    report = verify_dataset(load_dataset(root), warn=None)
    assert not report.ok and report.warnings == [] and report.dataset_problems == []


# --- small messages -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["3", 3.0, True, None, 5])
def test_num_training_must_be_an_integer(tmp_path: Path, value: object, capsys: pytest.CaptureFixture[str]) -> None:
    """nnU-Net checks numTraining against imagesTr; MSD readers (MONAI) go by the training list: a warning."""
    assert len(load_dataset(_msd(tmp_path / "msd", 3, numTraining=value)).cases) == 3
    msd = (
        "numTraining is 5 but 'training' lists 3 cases"
        if value == 5
        else f"numTraining must be an integer, got {value!r}"
    )
    assert f"{msd}; the 3 cases 'training' lists are used" in capsys.readouterr().err
    root = make_nnunet(tmp_path / "nn", n_cases=3, channels=1)
    _edit(root, numTraining=value)
    words = (
        "numTraining is 5 but imagesTr holds 3 cases"
        if value == 5
        else f"numTraining must be an integer, got {value!r}"
    )
    assert words in _description_problem(root)


def test_nnunet_label_without_an_image_is_a_problem(tmp_path: Path) -> None:
    root = make_nnunet(tmp_path / "ds", n_cases=2, channels=1)
    make_nifti(root / "labelsTr" / "case9.nii.gz", _label())
    text = _description_problem(root)
    assert "1 problem(s)" in text and "label without an image: " + str(root / "labelsTr" / "case9.nii.gz") in text


def test_nnunet_files_of_another_ending_are_named(tmp_path: Path) -> None:
    root = make_nnunet(tmp_path / "ds", n_cases=2, channels=1)
    (root / "imagesTr" / "case1_0000.nii.gz").rename(root / "imagesTr" / "case1_0000.nrrd")
    text = _description_problem(root)
    assert "numTraining is 2 but imagesTr holds 1 cases" in text
    assert "not ending in file_ending '.nii.gz' are ignored: case1_0000.nrrd" in text


def test_verify_refuses_a_plan_for_other_channels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    two = make_nnunet(tmp_path / "two", n_cases=2, channels=2)
    plan = tmp_path / "p" / "plan.json"
    assert _run(["plan", two, "--out", plan], capsys)[0] == 0
    one = _msd(tmp_path / "one", 2)
    code, _, err = _run(["verify", one, "--plan", plan], capsys)
    assert code == 2 and err.startswith(f"medgn: error: {plan}: the plan is for 2 input channel(s), the dataset has 1")
    assert _run(["verify", two, "--plan", plan], capsys)[0] == 0


def test_constant_channel_of_a_4d_image_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _msd(tmp_path / "ds", 2, modality={"0": "T1", "1": "T2"})
    image = _image(0, channels=2)
    image[..., 1] = 5.0
    make_nifti(root / "imagesTr" / "c1.nii.gz", image)
    make_nifti(root / "imagesTr" / "c0.nii.gz", _image(1, channels=2))
    code, _, err = _run(["verify", root], capsys)
    assert code == 0
    note = f"note: {root / 'imagesTr' / 'c1.nii.gz'}: channel 1 (T2) is a constant image (all voxels 5)"
    assert note in err.splitlines()
