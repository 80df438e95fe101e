"""Tests of which cases ``medgn evaluate`` scores and how it counts them: a case file that is no regular
file (dangling link, FIFO, folder) is a failed case, never silently left out; negative label values
are refused like non-integer ones; an all-background pair is one evaluated case; a label in no map of
any case is not scored (NaN, ``absent``) and left out of every mean, in every written form."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medgn.cli import main
from medgn.errors import InputDataError
from medgn.evaluate.run import evaluate

SHAPE = (12, 10, 8)
AFFINE = np.diag([1.5, 1.0, 2.0, 1.0])


def _save(path: Path, array: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(array, AFFINE), str(path))


def _cube(dtype: type = np.uint8, shift: int = 0) -> np.ndarray:
    """A 4-voxel cube of label 1, shifted along x by ``shift`` voxels."""
    a = np.zeros(SHAPE, dtype=dtype)
    a[3 + shift : 7 + shift, 3:7, 2:6] = 1
    return a


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """Cases c1 (Dice 1) and c3 (cube shifted by one voxel: Dice 3/4) in both folders."""
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    for cid, shift in (("c1", 0), ("c3", 1)):
        _save(ref / f"{cid}.nii.gz", _cube())
        _save(pred / f"{cid}.nii.gz", _cube(shift=shift))
    return pred, ref


def _dangling(path: Path) -> str:
    path.symlink_to(path.parent / "deleted.nii.gz")
    return "a symbolic link that leads nowhere"


def _fifo(path: Path) -> str:
    os.mkfifo(path)  # reading it would block the run
    return "neither a regular file nor a folder (a FIFO, socket or device)"


def _folder(path: Path) -> str:
    path.mkdir()
    return "a folder"


ODD_ENTRIES: dict[str, Callable[[Path], str]] = {"dangling link": _dangling, "FIFO": _fifo, "folder": _folder}


def _run(pred: Path, ref: Path, out: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    code = main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--out", str(out), "--worst-k", "0", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("side", ["ref", "pred"])
@pytest.mark.parametrize("kind", list(ODD_ENTRIES))
def test_a_case_entry_that_is_no_regular_file_is_a_failed_case(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, side: str
) -> None:
    pred, ref = folders
    odd_dir, other_dir = (ref, pred) if side == "ref" else (pred, ref)
    _save(other_dir / "c2.nii.gz", _cube())
    odd = odd_dir / "c2.nii.gz"
    what = ODD_ENTRIES[kind](odd)
    role = "reference" if side == "ref" else "prediction"
    code, out, err = _run(pred, ref, tmp_path / "out", capsys)
    assert code == 3, err
    assert "cases 3: evaluated 2, missing 0, failed 1" in out
    assert err.strip() == f"medgn: error: case c2: {odd}: {role} is not a label file: {what} (expected a regular file)"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert list(summary["failures"]) == ["c2"]
    assert [r["flags"] for r in summary["cases"] if r["case"] == "c2"] == [["failed"]]
    assert summary["per_class"]["1"]["dice"]["mean"] == pytest.approx((1.0 + 0.0 + 0.75) / 3)


def test_a_broken_reference_without_any_prediction_is_failed_not_missing(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    pred, ref = folders
    _dangling(ref / "c2.nii.gz")
    for allow in (False, True):  # neither refused as a missing prediction nor counted as one
        result = evaluate(pred, ref, allow_missing=allow)
        assert result.missing == [] and list(result.failures) == ["c2"] and result.exit_code == 3
        assert "reference is not a label file: a symbolic link that leads nowhere" in result.failures["c2"]


def test_a_dangling_prediction_with_allow_missing_is_failed_not_missing(folders: tuple[Path, Path]) -> None:
    pred, ref = folders
    _save(ref / "c2.nii.gz", _cube())
    _dangling(pred / "c2.nii.gz")
    result = evaluate(pred, ref, allow_missing=True)
    assert result.missing == [] and list(result.failures) == ["c2"] and result.exit_code == 3


@pytest.mark.parametrize("side", ["pred", "ref"])
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_negative_label_values_are_refused_naming_the_file(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], side: str, dtype: type
) -> None:
    pred, ref = folders
    negative = _cube(dtype)
    negative[0:3, 0:3, 0:3] = -1  # 27 voxels
    bad = (pred if side == "pred" else ref) / "c2.nii.gz"
    _save(pred / "c2.nii.gz", _cube(dtype))
    _save(ref / "c2.nii.gz", _cube(dtype))
    _save(bad, negative)
    code, out, err = _run(pred, ref, tmp_path / "out", capsys)
    assert code == 3 and "cases 3: evaluated 2, missing 0, failed 1" in out
    assert err.strip() == (
        f"medgn: error: case c2: {bad}: label has 27 voxels with negative values "
        "(got values like [-1], expected label values >= 0 (0 is background))"
    )


def test_an_all_background_pair_is_one_evaluated_case(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    _save(pred / "c1.nii.gz", np.zeros(SHAPE, np.uint8))
    _save(ref / "c1.nii.gz", np.zeros(SHAPE, np.uint8))
    code, out, err = _run(pred, ref, tmp_path / "out", capsys)
    assert code == 0
    assert "cases 1: evaluated 1, missing 0, failed 0" in out
    assert "no foreground label in any prediction or reference" in err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["counts"]["cases"] == 1 and summary["counts"]["evaluated"] == 1
    assert "Cases: 1, evaluated 1," in (tmp_path / "out" / "report.md").read_text()


def test_a_label_in_no_map_of_any_case_is_not_scored_and_left_out_of_the_means(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """nnU-Net/MONAI convention: a class with no voxels anywhere is NaN and not averaged in (was Dice 1)."""
    pred, ref = folders
    code, out, err = _run(pred, ref, tmp_path / "out", capsys, "--labels", "1,7", "--region", "far=7,9")
    assert code == 0
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    assert lines["7 (absent)"].split()[2:4] == ["0", "-"]  # n 0, no Dice mean
    assert lines["overall"].split()[1:3] == ["2", "0.875"]  # label 1 only: (1 + 3/4) / 2
    assert "label 7: in no reference and no prediction of any evaluated case" in err
    assert "region far: in no reference" in err
    with open(tmp_path / "out" / "metrics.csv", newline="") as handle:
        rows = {(r["case"], r["label"]): r for r in csv.DictReader(handle)}
    assert rows[("c1", "7")]["dice"] == "nan" and rows[("c1", "7")]["flags"] == "absent"
    assert rows[("c3", "far")]["hd95"] == "nan" and rows[("c3", "1")]["dice"] == "0.75"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())  # strict JSON: null, not NaN
    assert summary["absent"] == ["7", "far"]
    assert summary["per_class"]["7"]["dice"]["n"] == 0 and summary["per_class"]["7"]["dice"]["mean"] is None
    assert summary["per_class"]["far"]["dice"]["mean"] is None
    assert summary["overall"]["dice"]["n"] == 2 and summary["overall"]["dice"]["mean"] == pytest.approx(0.875)
    row = next(r for r in summary["cases"] if (r["case"], r["label"]) == ("c1", "7"))
    assert row["dice"] is None and row["flags"] == ["absent"] and row["infinite"] == []
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| 7 (absent) | 0 |" in report and "Not scored" in report
    # The Python API says the same.
    result = evaluate(pred, ref, labels=[1, 7])
    assert result.absent == ["7"] and math.isnan(result.value("c3", 7, "dice"))


def test_a_label_absent_from_one_case_only_still_scores_both_empty(folders: tuple[Path, Path], tmp_path: Path) -> None:
    """Only a label no case holds is left out: where another case has it, both-empty stays Dice 1."""
    pred, ref = folders
    with_7 = _cube()
    with_7[9:11, 7:9, 0:2] = 7
    _save(ref / "c3.nii.gz", with_7)
    _save(pred / "c3.nii.gz", with_7)
    result = evaluate(pred, ref, labels=[1, 7])
    assert result.absent == []
    assert result.value("c1", 7, "dice") == 1.0 and "both_empty" in next(
        r.metrics.flags for r in result.rows if (r.case, r.label) == ("c1", "7")
    )
    assert result.summary["per_class"]["7"]["dice"]["mean"] == 1.0


def test_a_failed_case_keeps_its_failure_rows_under_an_absent_label(folders: tuple[Path, Path]) -> None:
    pred, ref = folders
    _save(ref / "c2.nii.gz", _cube())
    (pred / "c2.nii.gz").write_bytes(b"not a volume")
    result = evaluate(pred, ref, labels=[1, 7])
    assert result.absent == ["7"] and list(result.failures) == ["c2"]
    assert [r.metrics.flags for r in result.rows if r.case == "c2"] == [("failed",), ("failed",)]
    # Label 1 still counts the failure as Dice 0; label 7 is scored in no case.
    assert result.summary["per_class"]["1"]["dice"]["mean"] == pytest.approx((1.0 + 0.0 + 0.75) / 3)
    assert result.summary["per_class"]["7"]["dice"]["n"] == 0
    assert result.summary["overall"]["dice"]["n"] == 3


def test_a_nifti_prediction_of_an_nrrd_reference_far_from_the_origin_is_scored(tmp_path: Path) -> None:
    """The same grid as NRRD (double) and NIfTI (float32 affine): -1123.4 mm is stored 2.4e-5 mm off."""
    import SimpleITK as sitk

    mask = np.zeros((12, 32, 32), np.uint8)
    mask[3:8, 8:20, 8:20] = 1
    img = sitk.GetImageFromArray(mask)
    img.SetSpacing((0.7, 0.7, 2.5))
    img.SetOrigin((-180.0, -200.0, -1123.4))
    sitk.WriteImage(img, str(tmp_path / "c1.nrrd"))
    sitk.WriteImage(img, str(tmp_path / "c1.nii.gz"))
    result = evaluate(tmp_path / "c1.nii.gz", tmp_path / "c1.nrrd")
    assert result.exit_code == 0 and not result.failures
    assert [row.metrics.dice for row in result.rows] == [1.0]


def test_headers_with_detached_data_are_cases_and_a_seg_reference_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """.mhd and .nhdr files (with their .raw) are cases like .mha and .nrrd, on both sides.

    They were not listed: a reference folder of a.mha, b.mhd and c.nhdr with only a predicted scored
    one case, exit 0. A DICOM-SEG reference fails its case with the reason; a prediction without a
    reference is said on the console; predictions named like images get a hint.
    """
    import SimpleITK as sitk

    mask = np.zeros((12, 16, 16), np.uint8)
    mask[3:8, 4:10, 4:10] = 1
    img = sitk.GetImageFromArray(mask)
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    for name in ("a.mha", "b.mhd", "c.nhdr"):
        sitk.WriteImage(img, str(ref / name))
    sitk.WriteImage(img, str(pred / "a.mha"))
    with pytest.raises(InputDataError, match=r"2 of 3 predictions missing: b, c"):
        evaluate(pred, ref)
    sitk.WriteImage(img, str(pred / "b.nhdr"))
    sitk.WriteImage(img, str(pred / "c.mhd"))
    sitk.WriteImage(img, str(pred / "extra.nii.gz"))
    result = evaluate(pred, ref)
    assert result.exit_code == 0 and sorted(row.case for row in result.rows) == ["a", "b", "c"]
    assert all(row.metrics.dice == 1.0 for row in result.rows)
    assert "1 prediction(s) have no reference and are ignored: extra" in capsys.readouterr().err
    (ref / "d.seg.dcm").write_bytes(b"DICM")
    sitk.WriteImage(img, str(pred / "d.nii.gz"))
    result = evaluate(pred, ref)
    assert result.exit_code == 3
    assert "a DICOM-SEG cannot be a reference" in " ".join(str(f) for f in result.failures.values())
    images = tmp_path / "images"
    images.mkdir()
    sitk.WriteImage(img, str(images / "a_0000.nii.gz"))
    with pytest.raises(InputDataError, match=r"named like images \(a_0000\).*without the _0000 channel suffix"):
        evaluate(images, ref)


def test_a_sheared_reference_fails_its_case_and_an_oblique_one_is_scored(tmp_path: Path) -> None:
    """Distances are taken along perpendicular voxel axes: on a sheared grid they were silently wrong."""
    mask = _cube()
    sheared = np.eye(4)
    sheared[0, 2] = np.tan(np.radians(30))  # the z axis leans 30 degrees towards x
    oblique = np.eye(4)
    c, s = np.cos(np.radians(25)), np.sin(np.radians(25))
    oblique[:2, :2] = [[c, -s], [s, c]]
    for name, affine in (("sheared", sheared), ("oblique", oblique)):
        for side in ("pred", "ref"):
            (tmp_path / name / side).mkdir(parents=True)
            nib.save(nib.Nifti1Image(mask, affine), str(tmp_path / name / side / "c.nii.gz"))
    result = evaluate(tmp_path / "sheared" / "pred", tmp_path / "sheared" / "ref")
    assert result.exit_code == 3
    (failure,) = [str(f) for f in result.failures.values()]
    assert "voxel axes are not perpendicular" in failure and "30 degrees off perpendicular" in failure
    result = evaluate(tmp_path / "oblique" / "pred", tmp_path / "oblique" / "ref")
    assert result.exit_code == 0 and [row.metrics.dice for row in result.rows] == [1.0]


def test_a_case_named_near_the_limit_gets_its_overlay(tmp_path: Path) -> None:
    """The overlay <case>_label-<label>.png of a 245-byte case name would be 257 bytes: an internal error."""
    for side in ("pred", "ref"):
        (tmp_path / side).mkdir()
    case = "c" * 245
    _save(tmp_path / "ref" / f"{case}.nii", _cube())
    _save(tmp_path / "pred" / f"{case}.nii", _cube(shift=1))
    result = evaluate(tmp_path / "pred", tmp_path / "ref", tmp_path / "out", worst_k=1)
    assert result.exit_code == 0
    (overlay,) = (tmp_path / "out" / "overlays").iterdir()
    assert overlay.name.startswith("c" * 200) and overlay.name.endswith(".png") and len(overlay.name) <= 255


def test_the_report_reads_without_the_source_and_shows_names_as_written(tmp_path: Path) -> None:
    # Case names were Markdown ("a|b*c*" split a table row and turned italic); "reference only"
    # meant "reference empty"; no metric was defined; regions had no worst cases or overlays; the
    # box plot counted an absent label's "0 inf" and drew missing cases as plain Dice-0 points.
    from medgn.evaluate.figures import boxplot_data

    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    for cid, shift in (("odd|name*x*", 1), ("c2", 0), ("lost", 0)):
        _save(ref / f"{cid}.nii.gz", _cube())
        if cid != "lost":
            _save(pred / f"{cid}.nii.gz", _cube(shift=shift))
    result = evaluate(pred, ref, tmp_path / "out", labels=[1, 5], regions={"both": [1, 5]}, allow_missing=True)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| odd\\|name\\*x\\* | 1 |" in report and "| odd|name" not in report
    assert "| 0.7500 |" in report and "0\\." not in report  # numbers stay plain
    assert "reference empty 0, prediction empty 0" in report and "reference only" not in report
    assert "**HD95**: the 95th percentile" in report and "population standard deviation" in report
    assert "## Worst cases" in report and "- region both: odd\\|name\\*x\\* (Dice 0.750)" in report
    assert result.summary["worst_cases"]["both"] == ["odd|name*x*", "c2"]
    assert any(p.name.endswith("_label-both.png") for p in (tmp_path / "out" / "overlays").iterdir())
    _, _, dice_ticks, hd_ticks = boxplot_data(result)
    keys = list(result.summary["per_class"])
    assert keys == ["1", "5", "both"]
    assert dice_ticks == ["1\n(1 missing/failed, Dice 0)", "5\n(absent)", "both\n(1 missing/failed, Dice 0)"]
    assert hd_ticks == ["1\n(1 inf)", "5\n(absent)", "both\n(1 inf)"]


def test_values_the_dataset_does_not_declare_fail_the_case(
    tmp_path: Path, folders: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # With --dataset, a stray label 7 in a prediction was scored as a class of its own (raising the
    # overall mean through its both-empty cases) or, with --labels, left out unseen.
    pred, ref = folders
    stray = _cube(shift=1)
    stray[0, 0, 0] = 7
    _save(pred / "c3.nii.gz", stray)
    dataset = tmp_path / "ds"
    dataset.mkdir()
    (dataset / "dataset.json").write_text(
        json.dumps({"name": "d", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "organ"}, "training": []})
    )
    out = tmp_path / "out"
    code = main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--out", str(out), "--dataset", str(dataset)])
    assert code == 3
    failures = json.loads((out / "summary.json").read_text())["failures"]
    assert (
        list(failures) == ["c3"]
        and "prediction holds label values the dataset does not declare (got [7]" in failures["c3"]
    )
    assert str(pred / "c3.nii.gz") in failures["c3"]
    capsys.readouterr()
    # Without --dataset nothing is declared: label 7 is a class like any other.
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--out", str(tmp_path / "o2")]) == 0


def test_a_region_name_with_a_slash_gets_its_overlay(tmp_path: Path, folders: tuple[Path, Path]) -> None:
    # "ET/TC" went into the overlay's file name as a folder: an internal error (exit 1).
    pred, ref = folders
    out = tmp_path / "out"
    argv = [
        "evaluate",
        "--pred",
        str(pred),
        "--ref",
        str(ref),
        "--out",
        str(out),
        "--region",
        "ET/TC=1",
        "--region",
        "ET_TC=1",  # another name with the same file word: its own file
        "--worst-k",
        "1",
    ]
    assert main(argv) == 0
    names = sorted(p.name for p in (out / "overlays").iterdir())
    assert names == ["c3_label-1.png", "c3_label-ET_TC.png", "c3_label-ET_TC_.png"], names
