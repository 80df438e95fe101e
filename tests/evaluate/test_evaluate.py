"""Tests of medgn.evaluate.run and ``medgn evaluate``: folder matching, known metrics on offset
cubes, missing predictions, a flipped-affine prediction, the files written, CLI exit codes, and
real LA2018 labels against an eroded copy."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medgn.cli import main
from medgn.errors import InputDataError, UsageError
from medgn.evaluate.run import evaluate

SPACING = (1.5, 1.0, 2.0)
SIDE = 8
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _save(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> None:
    nib.save(nib.Nifti1Image(array, np.diag([*SPACING, 1.0]) if affine is None else affine), str(path))


def _cube_case(offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: a cube of label 1 and a small block of label 2; prediction: the cube shifted."""
    ref = np.zeros((16, 14, 12), dtype=np.uint8)
    ref[3 : 3 + SIDE, 3 : 3 + SIDE, 2 : 2 + SIDE] = 1
    pred = np.zeros_like(ref)
    pred[3 + offset : 3 + SIDE + offset, 3 : 3 + SIDE, 2 : 2 + SIDE] = 1
    return pred, ref


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """Three cases with the cube shifted by 0, 1 and 2 voxels along x; case c2 also has label 2."""
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    for i, offset in enumerate([0, 1, 2]):
        pred, ref = _cube_case(offset)
        if i == 2:
            ref[13:15, 11:13, 0:2] = 2  # label 2 only in this reference, away from the cube: missed
        _save(ref_dir / f"c{i}.nii.gz", ref)
        _save(pred_dir / f"c{i}.nii.gz", pred)
    (ref_dir / "notes.txt").write_text("not a volume")  # ignored: not a volume suffix
    return pred_dir, ref_dir


def test_known_metrics_per_case_and_label(folders: tuple[Path, Path]) -> None:
    pred_dir, ref_dir = folders
    result = evaluate(pred_dir, ref_dir, nsd_tolerance_mm=2.0)
    assert result.labels == (1, 2)
    assert len(result.rows) == 3 * 2
    for i, offset in enumerate([0, 1, 2]):
        assert result.value(f"c{i}", 1, "dice") == pytest.approx((SIDE - offset) / SIDE, abs=1e-12)
        assert result.value(f"c{i}", 1, "hd95") == pytest.approx(offset * SPACING[0], abs=1e-6)
    # Label 2: both empty in c0 and c1 (Dice 1, distance 0), missed by the prediction in c2.
    assert [result.value(c, 2, "dice") for c in ("c0", "c1", "c2")] == [1.0, 1.0, 0.0]
    assert math.isinf(result.value("c2", 2, "hd95"))
    stats = result.summary["per_class"]
    assert stats["1"]["dice"]["mean"] == pytest.approx(np.mean([1.0, 7 / 8, 6 / 8]), abs=1e-12)
    assert stats["2"]["hd95"]["n_inf"] == 1 and stats["2"]["hd95"]["mean"] == 0.0
    assert stats["2"]["empty"] == {"both_empty": 2, "ref_empty": 0, "pred_empty": 1}
    assert result.exit_code == 0 and result.files == []


def test_region_union_and_explicit_labels(folders: tuple[Path, Path]) -> None:
    pred_dir, ref_dir = folders
    result = evaluate(pred_dir, ref_dir, labels=[1], regions={"any": (1, 2)})
    assert [r.label for r in result.rows if r.case == "c0"] == ["1", "any"]
    ref_voxels = SIDE**3 + 8  # the cube plus the 2x2x2 block of label 2
    assert result.value("c2", "any", "dice") == pytest.approx(2 * SIDE * SIDE * (SIDE - 2) / (SIDE**3 + ref_voxels))


def test_missing_prediction_is_an_error_unless_allowed(folders: tuple[Path, Path]) -> None:
    pred_dir, ref_dir = folders
    (pred_dir / "c1.nii.gz").unlink()
    with pytest.raises(InputDataError, match="c1") as info:
        evaluate(pred_dir, ref_dir)
    assert info.value.code == 3
    result = evaluate(pred_dir, ref_dir, allow_missing=True)
    assert result.missing == ["c1"]
    assert result.value("c1", 1, "dice") == 0.0 and math.isinf(result.value("c1", 1, "assd"))
    assert [r.metrics.flags for r in result.rows if r.case == "c1"] == [("missing",), ("missing",)]
    assert result.summary["counts"]["missing"] == 1 and result.summary["counts"]["evaluated"] == 2
    assert result.exit_code == 0  # the caller allowed it


def test_flipped_affine_prediction_is_refused_for_that_case(folders: tuple[Path, Path]) -> None:
    pred_dir, ref_dir = folders
    pred, _ = _cube_case(1)
    flipped = np.diag([-SPACING[0], SPACING[1], SPACING[2], 1.0])
    flipped[0, 3] = SPACING[0] * (pred.shape[0] - 1)  # same voxel box, x axis reversed
    _save(pred_dir / "c1.nii.gz", pred[::-1].copy(), flipped)
    result = evaluate(pred_dir, ref_dir)
    assert list(result.failures) == ["c1"]
    message = result.failures["c1"]
    assert (
        "direction" in message
        and "prediction affine [[-1.5, 0, 0, 22.5]" in message
        and "reference affine [[1.5, 0, 0, 0]" in message
    )
    assert result.exit_code == 3
    assert result.value("c1", 1, "dice") == 0.0 and result.value("c2", 1, "dice") == pytest.approx(6 / 8)
    assert result.summary["counts"]["failed"] == 1


def _png_ok(path: Path) -> bool:
    data = path.read_bytes()
    return len(data) > 100 and data.startswith(PNG_SIGNATURE)


def test_cli_writes_every_output(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pred_dir, ref_dir = folders
    images = tmp_path / "images"
    images.mkdir()
    _save(images / "c2_0000.nii.gz", np.random.default_rng(0).random((16, 14, 12)).astype(np.float32))
    out = tmp_path / "out"
    argv = [
        "evaluate",
        "--pred",
        str(pred_dir),
        "--ref",
        str(ref_dir),
        "--out",
        str(out),
        "--images",
        str(images),
        "--region",
        "any=1,2",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Dice mean" in printed and "overall" in printed
    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 * 3 and list(rows[0]) == ["case", "label", "dice", "iou", "hd95", "assd", "nsd", "flags"]
    missed = next(r for r in rows if r["case"] == "c2" and r["label"] == "2")
    assert missed["hd95"] == "inf" and missed["flags"] == "pred_empty"
    summary = json.loads((out / "summary.json").read_text())
    assert {"counts", "per_class", "overall", "missing", "failures", "settings", "cases"} <= set(summary)
    assert set(summary["per_class"]) == {"1", "2", "any"}
    assert set(summary["per_class"]["1"]["dice"]) == {"n", "n_finite", "n_inf", "mean", "std", "median", "min", "max"}
    row = next(r for r in summary["cases"] if r["case"] == "c2" and r["label"] == "2")
    assert row["hd95"] is None and row["infinite"] == ["hd95", "assd"] and row["flags"] == ["pred_empty"]
    assert "| 1 | 3 |" in (out / "report.md").read_text()
    assert _png_ok(out / "boxplot.png")
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert "c2_label-1.png" in overlays and all(_png_ok(out / "overlays" / n) for n in overlays)
    assert not [p for p in out.iterdir() if p.name.startswith(".medgn")]  # no temp files, lock released
    # A second run into the same folder is refused (code 2) unless --overwrite.
    assert main(argv) == 2
    (out / "overlays" / "mine.png").write_bytes(b"a user's file")
    assert main([*argv, "--overwrite", "--worst-k", "1"]) == 0
    # the earlier run's overlays go: the folder shows this evaluation's worst cases only
    kept = sorted(p.name for p in (out / "overlays").iterdir())
    # one per label and one for the region "any"
    assert len(kept) == 1 + 3 and "mine.png" in kept and set(kept) - {"mine.png"} < set(overlays)
    assert any(name.endswith("_label-any.png") for name in kept)
    assert main([*argv, "--overwrite", "--worst-k", "0"]) == 0
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["mine.png"]


def test_cli_exit_codes(folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pred_dir, ref_dir = folders
    base = ["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir)]
    with pytest.raises(SystemExit) as info:
        main([*base, "--out", str(tmp_path / "o1"), "--labels", "1,x"])
    assert info.value.code == 2
    assert main([*base, "--out", str(ref_dir / "inside")]) == 2
    assert main([*base, "--out", str(tmp_path / "o2"), "--labels", "0"]) == 2
    (pred_dir / "c0.nii.gz").unlink()
    assert main([*base, "--out", str(tmp_path / "o3")]) == 3
    assert "c0" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "o4"), "--allow-missing", "--worst-k", "0"]) == 0
    pred, _ = _cube_case(0)
    _save(pred_dir / "c1.nii.gz", pred, np.diag([1.0, 1.0, 1.0, 1.0]))  # wrong spacing
    assert main([*base, "--out", str(tmp_path / "o5"), "--allow-missing", "--worst-k", "0"]) == 3
    err = capsys.readouterr().err
    assert "case c1" in err and "spacing" in err


def test_bad_arguments(folders: tuple[Path, Path], tmp_path: Path) -> None:
    pred_dir, ref_dir = folders
    with pytest.raises(UsageError):
        evaluate(tmp_path / "nope", ref_dir)
    with pytest.raises(UsageError, match="region"):
        evaluate(pred_dir, ref_dir, regions={"7": (1,)})
    with pytest.raises(UsageError, match="tolerance"):
        evaluate(pred_dir, ref_dir, nsd_tolerance_mm=-1.0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputDataError, match="no reference"):
        evaluate(pred_dir, empty)


def test_bad_options_are_named_as_typed(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pred_dir, ref_dir = folders
    base = ["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--out", str(tmp_path / "o")]
    for extra, words in (
        (["--nsd-tolerance-mm", "-1"], "--nsd-tolerance-mm: must be"),
        (["--worst-k", "-2"], "--worst-k"),
    ):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"medgn: error: {words}"), err
    assert not (tmp_path / "o").exists()


@pytest.mark.data
def test_la2018_eroded_label_dice_matches_numpy(shared_data: Path, tmp_path: Path) -> None:
    from scipy.ndimage import binary_erosion

    labels = sorted((shared_data / "LA2018" / "labelsTr").glob("*.nii.gz"))[:2]
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    expected = {}
    for path in labels:
        img = nib.load(str(path))
        ref = np.asanyarray(img.dataobj) > 0
        pred = binary_erosion(ref, iterations=2)  # a deliberately thinned prediction
        header = img.header.copy()
        header.set_data_dtype(np.uint8)
        nib.save(nib.Nifti1Image(pred.astype(np.uint8), img.affine, header), str(pred_dir / path.name))
        (ref_dir / path.name).symlink_to(path)
        cid = path.name[: -len(".nii.gz")]
        inter = np.count_nonzero(pred & ref)
        expected[cid] = 2.0 * inter / (np.count_nonzero(pred) + np.count_nonzero(ref))
    result = evaluate(pred_dir, ref_dir, labels=[1])
    assert result.exit_code == 0
    for cid, dice in expected.items():
        assert result.value(cid, 1, "dice") == pytest.approx(dice, abs=1e-12)
        assert 0.5 < dice < 0.99  # the erosion really changed the mask
        # Two erosions at 0.625 mm: no reference surface point is more than ~2 voxels from the prediction.
        assert 0 < result.value(cid, 1, "hd95") <= 2 * 0.625 * math.sqrt(3) + 1e-6


def test_unreadable_prediction_fails_that_case_only(folders: tuple[Path, Path]) -> None:
    pred_dir, ref_dir = folders
    (pred_dir / "c0.nii.gz").write_bytes(b"not a nifti file at all")
    result = evaluate(pred_dir, ref_dir)
    assert list(result.failures) == ["c0"] and "c0.nii.gz" in result.failures["c0"]
    assert result.exit_code == 3 and result.value("c1", 1, "dice") == pytest.approx(7 / 8)


def test_cli_reads_regions_from_dataset_json(folders: tuple[Path, Path], tmp_path: Path) -> None:
    pred_dir, ref_dir = folders
    dataset = tmp_path / "ds"
    (dataset / "imagesTr").mkdir(parents=True)
    (dataset / "labelsTr").mkdir()
    for ref in ref_dir.glob("*.nii.gz"):
        (dataset / "labelsTr" / ref.name).symlink_to(ref)
        (dataset / "imagesTr" / ref.name.replace(".nii.gz", "_0000.nii.gz")).symlink_to(ref)
    desc = {
        "channel_names": {"0": "MR"},
        "labels": {"background": 0, "cube": [1], "anything": [1, 2]},
        "regions_class_order": [1, 2],
        "numTraining": 3,
        "file_ending": ".nii.gz",
    }
    (dataset / "dataset.json").write_text(json.dumps(desc))
    out = tmp_path / "out"
    argv = [
        "evaluate",
        "--pred",
        str(pred_dir),
        "--ref",
        str(ref_dir),
        "--out",
        str(out),
        "--dataset",
        str(dataset),
        "--worst-k",
        "0",
    ]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["regions"] == {"cube": [1], "anything": [1, 2]}
    assert summary["per_class"]["cube"]["dice"]["mean"] == pytest.approx(summary["per_class"]["1"]["dice"]["mean"])


def test_dataset_label_names_are_shown_beside_the_numbers(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The printed table, report.md, summary.json and the overlays said "label 2", where the dataset
    # calls it by a name the reader knows.
    pred_dir, ref_dir = folders
    dataset = tmp_path / "ds"
    (dataset / "imagesTr").mkdir(parents=True)
    (dataset / "labelsTr").mkdir()
    for ref in ref_dir.glob("*.nii.gz"):
        (dataset / "labelsTr" / ref.name).symlink_to(ref)
        (dataset / "imagesTr" / ref.name).symlink_to(ref)
    desc = {
        "name": "named",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "left atrium", "2": "scar|tissue"},
        "numTraining": 3,
        "training": [
            {"image": f"./imagesTr/{r.name}", "label": f"./labelsTr/{r.name}"} for r in sorted(ref_dir.glob("*.nii.gz"))
        ],
    }
    (dataset / "dataset.json").write_text(json.dumps(desc))
    out = tmp_path / "out"
    argv = ["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--out", str(out), "--dataset", str(dataset)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "1 (left atrium)" in printed and "2 (scar|tissue)" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["label_names"] == {"1": "left atrium", "2": "scar|tissue"}
    assert set(summary["per_class"]) == {"1", "2"}  # keys stay the numbers
    report = (out / "report.md").read_text()
    assert "| 1 (left atrium) |" in report and "| 2 (scar\\|tissue) |" in report
    assert "- label 2 (scar\\|tissue): c2 (Dice 0.000)" in report
    # Without a dataset, numbers alone, as before.
    assert main(["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--out", str(out), "--overwrite"]) == 0
    assert "left atrium" not in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["label_names"] == {}


def test_an_overlay_title_names_the_label(folders: tuple[Path, Path], tmp_path: Path, monkeypatch) -> None:
    import medgn.evaluate.figures as figures

    titles: list[str] = []
    real = figures._overlay

    def spy(path, title, *args):
        titles.append(title)
        return real(path, title, *args)

    monkeypatch.setattr(figures, "_overlay", spy)
    pred_dir, ref_dir = folders
    result = evaluate(pred_dir, ref_dir, tmp_path / "out", worst_k=1, label_names={0: "background", 2: "scar"})
    assert figures.boxplot_data(result)[2][1].startswith("2 (scar)")
    assert any(t.startswith("c2, label 2 (scar): Dice 0.000") for t in titles), titles
    assert any(", label 1: Dice" in t for t in titles), titles


def test_locked_output_folder_is_refused(folders: tuple[Path, Path], tmp_path: Path) -> None:
    from medgn.files import RunLock

    pred_dir, ref_dir = folders
    out = tmp_path / "out"
    out.mkdir()
    with RunLock(out, purpose="another run"):
        assert main(["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--out", str(out)]) == 6
    assert not (out / "metrics.csv").exists()


def test_one_prediction_file_against_one_reference_file(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pred_dir, ref_dir = folders
    # Names need not match: the case is named after the reference.
    pred = tmp_path / "model_output.nii.gz"
    pred.write_bytes((pred_dir / "c1.nii.gz").read_bytes())
    image = tmp_path / "scan.nii.gz"
    _save(image, np.random.default_rng(0).random((16, 14, 12)).astype(np.float32))
    result = evaluate(pred, ref_dir / "c1.nii.gz", tmp_path / "out", image_dir=image)
    assert [(r.case, r.label) for r in result.rows] == [("c1", "1")]
    assert result.value("c1", 1, "dice") == pytest.approx((SIDE - 1) / SIDE, abs=1e-12)
    assert (tmp_path / "out" / "metrics.csv").is_file()
    assert [p.name for p in (tmp_path / "out" / "overlays").iterdir()] == ["c1_label-1.png"]
    # A file and a folder, a missing file, a file that is not a volume: one-line usage errors.
    notes = ref_dir / "notes.txt"
    fifo = tmp_path / "fifo.nii.gz"  # reading it would block
    os.mkfifo(fifo)
    dangling = tmp_path / "gone.nii.gz"
    dangling.symlink_to(tmp_path / "deleted.nii.gz")
    for p, r, message in (
        (pred, ref_dir, f"{ref_dir}: a folder, but the other of --pred/--ref is a file"),
        (pred_dir, ref_dir / "c1.nii.gz", f"{pred_dir}: a folder, but the other of --pred/--ref is a file"),
        (fifo, ref_dir / "c1.nii.gz", f"{fifo}: neither a regular file nor a folder"),
        (pred, fifo, f"{fifo}: neither a regular file nor a folder"),
        (fifo, ref_dir, f"{fifo}: not a folder: neither a regular file nor a folder"),
        (dangling, ref_dir / "c1.nii.gz", f"{dangling}: a symbolic link that leads nowhere"),
        (dangling, ref_dir, f"{dangling}: not a folder: a symbolic link that leads nowhere"),
        (pred, tmp_path / "missing.nii.gz", "not found"),
        (pred, notes, "not a label volume"),
    ):
        code = main(["evaluate", "--pred", str(p), "--ref", str(r), "--out", str(tmp_path / "o2")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o2").exists()


def test_only_predicted_scores_a_subset_against_every_reference(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pred_dir, ref_dir = folders
    every = evaluate(pred_dir, ref_dir, only_predicted=True)  # nothing left out: still recorded as asked
    assert every.summary["settings"]["only_predicted"] is True
    assert every.summary["counts"]["references_not_predicted"] == 0
    (pred_dir / "c2.nii.gz").unlink()  # predictions for c0 and c1 only
    with pytest.raises(InputDataError, match="--only-predicted"):
        evaluate(pred_dir, ref_dir)
    result = evaluate(pred_dir, ref_dir, tmp_path / "out", only_predicted=True)
    assert sorted({r.case for r in result.rows}) == ["c0", "c1"] and result.missing == []
    assert result.summary["counts"]["references_not_predicted"] == 1
    assert result.summary["counts"]["cases"] == 2 and result.exit_code == 0
    assert "1 references left out" in (tmp_path / "out" / "report.md").read_text()
    # Label 2 exists only in c2's reference: with c2 left out, only label 1 is found.
    assert result.labels == (1,)
    with pytest.raises(UsageError, match="--allow-missing"):
        evaluate(pred_dir, ref_dir, only_predicted=True, allow_missing=True)
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "x9.nii.gz").write_bytes((pred_dir / "c0.nii.gz").read_bytes())
    code = main(
        ["evaluate", "--pred", str(empty), "--ref", str(ref_dir), "--out", str(tmp_path / "o"), "--only-predicted"]
    )
    assert code == 3 and "no prediction is named like a reference case" in capsys.readouterr().err
    # The same wrong folder with --allow-missing (or none): refused, not a report of zeros.
    for allow in (True, False):
        with pytest.raises(InputDataError, match="1 predictions, 3 references"):
            evaluate(empty, ref_dir, allow_missing=allow)


@pytest.mark.parametrize("axes", ["RAS", "LAS", "SRA"])
def test_overlays_show_the_planes_of_a_localised_error_and_the_centre_otherwise(axes: str) -> None:
    """A missed end of a cube moves the axial plane there; a blob outside it, or an even error, does not."""
    from scipy.ndimage import binary_dilation

    from medgn.evaluate.figures import overlay_slices

    ref = np.zeros((20, 18, 16), dtype=bool)
    ref[4:11, 5:12, 6:13] = True  # centre (7, 8, 9)
    pred = ref.copy()
    pred[15:18, 2:4, 1:3] = True  # a spurious blob in planes that do not cut the reference
    pred[4:11, 5:12, 12] = False  # a missed end: 49 wrong voxels in axial plane 12, none in plane 9
    dilated = binary_dilation(ref)  # one voxel too large all round: the same error in every plane
    affine = np.diag([*SPACING, 1.0])
    if axes == "LAS":  # array x runs right-to-left
        affine[0, 0] = -affine[0, 0]
    if axes == "SRA":  # array axis 0 is superior, 1 right, 2 anterior: the axial normal is array axis 0
        affine = affine[:, [2, 0, 1, 3]]
        ref, pred, dilated = (a.transpose(2, 0, 1) for a in (ref, pred, dilated))
    assert overlay_slices(ref, pred, affine) == {"axial": 12, "coronal": 8, "sagittal": 7}
    assert overlay_slices(ref, dilated, affine) == {"axial": 9, "coronal": 8, "sagittal": 7}
    assert overlay_slices(ref, ref, affine) == {"axial": 9, "coronal": 8, "sagittal": 7}
    empty = np.zeros_like(ref)
    middle = {"axial": ref.shape[2 if axes != "SRA" else 0] // 2}
    assert overlay_slices(empty, empty, affine)["axial"] == middle["axial"]


def test_images_that_match_no_case_are_refused_and_a_missing_one_is_named_in_its_overlay(
    folders: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import medgn.evaluate.figures as figures

    pred_dir, ref_dir = folders
    wrong = tmp_path / "other_images"
    wrong.mkdir()
    _save(wrong / "x9.nii.gz", np.zeros((16, 14, 12), np.float32))
    argv = ["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--out", str(tmp_path / "o")]
    assert main([*argv, "--images", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert f"{wrong}: no image named like any reference case" in err and err.count("\n") == 1, err
    assert main([*argv, "--images", str(wrong / "x9.nii.gz")]) == 2  # one image for a folder of cases
    assert "--images: a file, but --pred and --ref are folders" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # Images for some cases: the others' overlays say they are drawn over the reference.
    titles: list[str] = []
    real = figures._overlay
    monkeypatch.setattr(figures, "_overlay", lambda path, title, *a: titles.append(title) or real(path, title, *a))
    _save(wrong / "c2.nii.gz", np.random.default_rng(0).random((16, 14, 12)).astype(np.float32))
    assert main([*argv, "--images", str(wrong)]) == 0
    notes = {t.split(",")[0]: t.endswith("(no image found: over the reference)") for t in titles}
    assert notes["c2"] is False and notes["c1"] is True, titles
    # An unreadable image still gets its case's overlay, drawn over the reference and saying why.
    titles.clear()
    (wrong / "c1.nii.gz").write_bytes(b"not a nifti")
    assert main([*argv, "--images", str(wrong), "--overwrite"]) == 0
    notes = {t.split(",")[0]: t for t in titles}
    assert notes["c1"].endswith("(image unreadable: over the reference)"), titles
    assert (tmp_path / "o" / "overlays" / "c1_label-1.png").is_file()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_outputs_are_replaced_as_one_set(
    folders: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run that fails while writing (a full disk, a kill) leaves the earlier evaluation whole.

    The files were written one by one into the folder: a failure after metrics.csv left the new
    metrics beside the old summary and report, taken as a finished evaluation by the next run.
    """
    import errno

    import medgn.evaluate.report as report

    pred_dir, ref_dir = folders
    out = tmp_path / "out"
    argv = ["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--out", str(out)]
    assert main(argv) == 0
    before = _snapshot(out)
    assert "overlays/c2_label-1.png" in before and "summary.json" in before

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "atomic_write_json", full)  # summary.json: after metrics.csv and the figures
    assert main(["evaluate", "--pred", str(ref_dir), "--ref", str(ref_dir), "--out", str(out), "--overwrite"]) == 5
    assert "no space left on device" in capsys.readouterr().err
    assert _snapshot(out) == before
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".medgn")) == []
    monkeypatch.undo()
    # What a run killed while moving its outputs into place leaves: no summary.json. The next run
    # replaces it without --overwrite, and removes the staging folder a killed run left.
    (out / "summary.json").unlink()
    (out / ".medgn-tmp-abc123-evaluation" / "overlays").mkdir(parents=True)
    assert main(argv) == 0
    assert (out / "summary.json").is_file() and not (out / ".medgn-tmp-abc123-evaluation").exists()
    assert main(argv) == 2 and "already holds evaluation results" in capsys.readouterr().err
