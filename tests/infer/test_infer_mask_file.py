"""``medgn infer --output mask.nii.gz``: one scan's mask written to the file the user names.

An ``--output`` ending in a mask suffix names the mask of a single case (its format may differ from
the input's); its sidecar sits beside it, no ``report.json`` is written, and the run locks and
cleans only its own files, so that several such runs can share a folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import _infer_fixtures as F
import numpy as np
import pytest

from medgn.cli import main
from medgn.errors import LockedError, UsageError
from medgn.files import LOCK_NAME, TEMP_MARK, RunLock
from medgn.infer.outputs import mask_file
from medgn.infer.predictor import Predictor
from medgn.infer.run import infer, mask_lock_name

AFFINE = F.axis_affines()[5]


def _scan(folder: Path, name: str = "a.nii.gz", seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return F.write_image(folder / name, F.image(seed), AFFINE)


def _predictor() -> Predictor:
    return Predictor.from_modules([F.ThresholdNet()], F.plan())


def test_mask_file_tells_files_from_folders(tmp_path: Path) -> None:
    target = mask_file(tmp_path / "sub" / "Mask.NII.GZ")
    assert target is not None and (target.stem, target.suffix) == ("Mask", ".NII.GZ")
    assert target.path == (tmp_path / "sub" / "Mask.NII.GZ").resolve()
    assert mask_file(tmp_path / "x.nrrd").suffix == ".nrrd"  # type: ignore[union-attr]
    assert mask_file(tmp_path / "preds") is None
    assert mask_file(str(tmp_path / "m.nii.gz") + "/") is None  # a trailing slash asks for a folder
    (tmp_path / "old.nii.gz").mkdir()
    assert mask_file(tmp_path / "old.nii.gz") is None  # an existing folder stays a folder
    with pytest.raises(UsageError, match="DICOM-SEG"):
        mask_file(tmp_path / "seg.dcm")
    with pytest.raises(UsageError, match="no stem"):
        mask_file(tmp_path / ".nii.gz")
    for name in ("mask.txt", "mask.mhd", "mask.NRRD.gz", "masks.png"):  # a file name, not a mask medgn writes
        with pytest.raises(UsageError, match="medgn writes no mask in this format"):
            mask_file(tmp_path / name)
    assert mask_file(tmp_path / "preds.v2") is None  # a dotted folder name is still a folder
    assert mask_file(str(tmp_path / "preds.json") + "/") is None  # as is any name with a trailing slash
    (tmp_path / "made.txt").mkdir()
    assert mask_file(tmp_path / "made.txt") is None  # as is an existing folder of any name


def test_an_output_named_like_another_file_type_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scan = _scan(tmp_path / "in")
    out = tmp_path / "out" / "mask.txt"
    assert main(["infer", "--model", str(tmp_path / "no_model"), "--input", str(scan), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--output: medgn writes no mask in this format" in err[0], err
    assert not (tmp_path / "out").exists()


def test_named_mask_is_written_with_its_sidecar_and_no_report(tmp_path: Path) -> None:
    from medgn.data.io import geometry_diff, read_volume

    scan = _scan(tmp_path / "in")
    out = tmp_path / "new" / "deeper" / "liver_mask.nii.gz"
    report = infer(_predictor(), scan, out)
    assert report.exit_code == 0 and report.mask_file == out.resolve()
    assert sorted(p.name for p in out.parent.iterdir()) == ["liver_mask.json", "liver_mask.nii.gz"]
    mask = read_volume(out)
    assert np.array_equal(mask.array == 1, F.blob())
    assert geometry_diff(read_volume(scan), mask) == []
    sidecar = json.loads((out.parent / "liver_mask.json").read_text())
    assert sidecar["status"] == "done" and sidecar["outputs"] == ["liver_mask.nii.gz"]
    again = infer(_predictor(), scan, out)
    assert [c.status for c in again.cases] == ["skipped"]


def test_named_mask_in_another_format_keeps_the_geometry(tmp_path: Path) -> None:
    from medgn.data.io import geometry_diff, read_volume

    scan = _scan(tmp_path / "in")
    report = infer(_predictor(), scan, tmp_path / "out" / "a.nrrd")
    assert report.exit_code == 0
    mask = read_volume(tmp_path / "out" / "a.nrrd")
    assert mask.format == "nrrd" and np.array_equal(mask.array == 1, F.blob())
    assert geometry_diff(read_volume(scan), mask) == []
    # The same stem in NIfTI replaces the record (a.json): another setting, so only with --overwrite.
    refused = infer(_predictor(), scan, tmp_path / "out" / "a.nii.gz")
    assert [(c.status, c.code) for c in refused.cases] == [("failed", 2)]
    assert not (tmp_path / "out" / "a.nii.gz").exists()


def test_named_mask_beside_its_input_and_the_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scan = _scan(tmp_path / "in")
    before = scan.read_bytes()
    assert infer(_predictor(), scan, tmp_path / "in" / "a_mask.mha").exit_code == 0  # beside the input is fine
    assert (tmp_path / "in" / "a_mask.mha").is_file()
    missing_model = str(tmp_path / "no-such-run")  # loading it would be exit 4: every refusal comes first
    cases = [
        (scan, scan, "replace the input file"),
        (scan, tmp_path / "in", "input file's folder"),  # a folder: the input's own is refused
        (tmp_path / "in", tmp_path / "several.nii.gz", "input holds"),
    ]
    _scan(tmp_path / "in", "b.nii.gz", seed=1)
    (tmp_path / "link.nii.gz").symlink_to(scan)
    cases.append((scan, tmp_path / "link.nii.gz", "replace the input file"))
    # 245 bytes: a legal name, but its <stem>_probabilities.npz would not be
    cases.append((scan, tmp_path / ("m" * 238 + ".nii.gz"), "mask name too long for the files written beside it"))
    for source, output, message in cases:
        code = main(["infer", "--model", missing_model, "--input", str(source), "--output", str(output)])
        err = capsys.readouterr().err
        assert code == 2, err
        assert err.count("\n") == 1 and message in err
    assert scan.read_bytes() == before and not (tmp_path / "several.nii.gz").exists()
    code = main(
        ["infer", "--model", missing_model, "--input", str(scan), "--output", str(tmp_path / "x.nii.gz")]
        + ["--shard", "0/2"]
    )
    assert code == 2 and "shards" in capsys.readouterr().err
    code = main(
        ["infer", "--model", missing_model, "--input", str(scan), "--output", str(tmp_path / "x.nii.gz")]
        + ["--output-format", "dicom-seg"]
    )
    assert code == 2 and "dicom-seg writes no .nii.gz mask" in capsys.readouterr().err
    code = main(
        ["infer", "--model", missing_model, "--input", str(scan), "--output", str(tmp_path / "x.mha")]
        + ["--output-format", "nifti"]
    )  # a .mha was written, the option silently ignored
    assert code == 2 and "nifti writes a NIfTI mask, but --output names a .mha file" in capsys.readouterr().err
    # Under torchrun every process would write the one mask (one lost the race, the other was killed).
    with pytest.MonkeyPatch.context() as env:
        for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
            env.setenv(name, value)
        code = main(["infer", "--model", missing_model, "--input", str(scan), "--output", str(tmp_path / "x.nii.gz")])
    assert code == 2 and "one named mask cannot be split among 2 processes" in capsys.readouterr().err
    # An input folder (a DICOM series, a folder of one scan) gets nothing new: its next read would
    # find the mask. Outside it, a folder of one case takes a named mask.
    one = _scan(tmp_path / "one").parent
    with pytest.raises(UsageError, match="inside the input folder"):
        infer(_predictor(), one, one / "mask.nii.gz")
    assert infer(_predictor(), one, tmp_path / "one_mask.nii.gz").exit_code == 0


def test_named_masks_share_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scan = _scan(tmp_path / "in")
    out = tmp_path / "masks"
    out.mkdir()
    # A folder run holds the folder's lock, and another run's temporary file is in flight: a named
    # mask locks and cleans only its own files.
    folder_lock = RunLock(out, purpose="infer").acquire()
    other_temp = out / f"{TEMP_MARK}0123456789ab-a.v2.nii.gz"  # another run's mask "a.v2.nii.gz"
    other_temp.write_bytes(b"partial")
    own_temp = out / f"{TEMP_MARK}0123456789ab-a.nii.gz"
    own_temp.write_bytes(b"partial")
    assert main(["infer", "--model", str(tmp_path / "run"), "--input", str(scan), "--output", str(out)]) == 6
    capsys.readouterr()
    report = infer(_predictor(), scan, out / "a.nii.gz")
    assert report.exit_code == 0 and (out / "a.nii.gz").is_file()
    assert other_temp.exists() and not own_temp.exists()
    assert (out / LOCK_NAME).exists() and sorted(p.name for p in out.glob(".medgn-*.lock")) == []
    # A folder run into that folder (its lock free again) cleans its own cases' temps, not the
    # temp file of a named mask being written.
    folder_lock.release()
    folder = tmp_path / "batch"
    _scan(folder, "b.nii.gz", seed=3)
    assert infer(_predictor(), folder, out).exit_code == 0
    assert other_temp.exists() and (out / "b.nii.gz").is_file() and (out / "report.json").is_file()


def test_two_runs_never_write_the_same_mask_of_one_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "batch"
    for i, name in enumerate(("a.nii.gz", "b.nii.gz")):
        _scan(folder, name, seed=i)
    out = tmp_path / "masks"
    out.mkdir()
    # A named-mask run is writing a.nii.gz: a folder run over a and b is refused, writing nothing.
    mask_a = RunLock(out, purpose="infer", name=mask_lock_name("a")).acquire()
    assert main(["infer", "--model", str(tmp_path / "run"), "--input", str(folder), "--output", str(out)]) == 6
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mask a is being written by another medgn run" in err[0]
    assert sorted(p.name for p in out.iterdir()) == [mask_lock_name("a")]  # its locks released
    # ... and so is a shard whose cases include a; the shard without it runs
    with pytest.raises(LockedError, match="mask a "):
        infer(_predictor(), folder, out, shard="0/2")
    assert infer(_predictor(), folder, out, shard="1/2").exit_code == 0 and (out / "b.nii.gz").is_file()
    # A folder run holds the lock of every mask it writes: a named-mask run for one of them is refused.
    mask_a.release()
    mask_c = RunLock(out, purpose="infer", name=mask_lock_name("c")).acquire()  # as a folder run writing c holds it
    _scan(tmp_path / "one", "c.nii.gz", seed=5)
    assert main(["infer", "--model", str(tmp_path / "run"), "--input", str(tmp_path / "one" / "c.nii.gz"),
                 "--output", str(out / "c.nii.gz")]) == 6  # fmt: skip
    assert "mask c is being written by another medgn run" in capsys.readouterr().err  # as the other way round
    assert not (out / "c.nii.gz").exists()
    mask_c.release()


def test_the_summary_line_stays_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = F.save_run(tmp_path / "run")
    scan = _scan(tmp_path / "in")
    out = tmp_path / "out" / "odd\nname.nii.gz"
    assert main(["infer", "--model", str(run), "--input", str(scan), "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].endswith("odd\\nname.nii.gz") and out.is_file()


def test_a_named_mask_whose_case_fails_leaves_no_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import nibabel as nib

    run = F.save_run(tmp_path / "run")
    two = tmp_path / "in" / "two.nii.gz"  # a 4D file for a one-channel model: the case fails (exit 3)
    two.parent.mkdir()
    nib.save(nib.Nifti1Image(np.stack([F.image(0), F.image(1)], -1), AFFINE), two)
    target = tmp_path / "new" / "deeper" / "mask.nii.gz"
    assert main(["infer", "--model", str(run), "--input", str(two), "--output", str(target)]) == 3
    assert "expected 3D" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "kept"
    existing.mkdir()
    assert main(["infer", "--model", str(run), "--input", str(two), "--output", str(existing / "m.nii.gz")]) == 3
    assert existing.is_dir() and not list(existing.iterdir())  # a folder it did not make stays


def test_two_formats_of_one_mask_name_say_they_share_a_provenance_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = F.save_run(tmp_path / "run")
    scan = _scan(tmp_path / "in")
    out = tmp_path / "masks"
    base = ["infer", "--model", str(run), "--input", str(scan), "--output"]
    assert main([*base, str(out / "ct_seg.nrrd")]) == 0
    capsys.readouterr()
    assert main([*base, str(out / "ct_seg.mha")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ct_seg.json records the mask ct_seg.nrrd, and ct_seg.mha would share it" in err[0]
    assert not (out / "ct_seg.mha").exists()
    assert main([*base, str(out / "ct_seg.nrrd")]) == 0  # the same mask again: done earlier, skipped


@pytest.mark.parametrize("outputs", [None, 3, "ct_seg.nrrd", [1, None]])
def test_a_foreign_provenance_file_beside_a_mask_is_refused_cleanly(outputs: object, tmp_path: Path) -> None:
    from medgn.infer.case import refuse_existing

    stem = tmp_path / "ct_seg"
    error = refuse_existing(stem, [tmp_path / "ct_seg.json"], {"outputs": outputs}, "ct_seg.nii.gz")
    assert isinstance(error, UsageError) and "ct_seg.json" in error.one_line()
