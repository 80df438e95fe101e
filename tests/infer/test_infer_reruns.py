"""What a rerun of ``medgn infer`` does with the outputs an earlier run left: skip only what is intact,
redo what is ours but gone or damaged, remove what an --overwrite no longer writes, and refuse
damaged records without an internal error."""

from __future__ import annotations

import json
from pathlib import Path

import _infer_fixtures as F
import pytest

from medgn.cli import main

AFFINE = F.axis_affines()[0]


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    run = F.save_run(tmp_path / "run")
    scans = tmp_path / "in"
    scans.mkdir()
    for name in ("a", "b"):
        F.write_image(scans / f"{name}.nii.gz", F.image(), AFFINE)
    out = tmp_path / "out"
    assert (
        main(["infer", "--model", str(run), "--input", str(scans), "--output", str(out), "--save-probabilities"]) == 0
    )
    return run, scans, out


def _rerun(run: Path, scans: Path, out: Path, *extra: str) -> dict[str, str]:
    code = main(["infer", "--model", str(run), "--input", str(scans), "--output", str(out), *extra])
    report = json.loads((out / "report.json").read_text())
    return {"code": code, **{c["case_id"]: c["status"] for c in report["cases"]}}


def test_a_rerun_redoes_what_was_deleted_and_keeps_what_was_changed(setup, capsys) -> None:
    run, scans, out = setup
    sidecar = json.loads((out / "a.json").read_text())
    assert set(sidecar["output_sha256"]) == {"a.nii.gz", "a_probabilities.npz"}
    assert _rerun(run, scans, out, "--save-probabilities") == {"code": 0, "a": "skipped", "b": "skipped"}
    (out / "a.nii.gz").unlink()  # the mask alone deleted: was refused as "another model" (exit 2)
    assert _rerun(run, scans, out, "--save-probabilities") == {"code": 0, "a": "ok", "b": "skipped"}
    assert (out / "a.nii.gz").is_file()
    # A mask corrected by hand (or damaged) has other bytes than recorded: never predicted over silently.
    corrected = bytearray((out / "b.nii.gz").read_bytes())
    (out / "b.nii.gz").write_bytes(bytes(corrected[:-1]) + bytes([corrected[-1] ^ 1]))
    kept = (out / "b.nii.gz").read_bytes()
    assert _rerun(run, scans, out, "--save-probabilities") == {"code": 2, "a": "skipped", "b": "failed"}
    message = next(c for c in json.loads((out / "report.json").read_text())["cases"] if c["case_id"] == "b")["message"]
    assert "outputs changed since medgn wrote them (edited by hand, or damaged): b.nii.gz" in message
    assert (out / "b.nii.gz").read_bytes() == kept
    assert _rerun(run, scans, out, "--save-probabilities", "--overwrite") == {"code": 0, "a": "skipped", "b": "ok"}
    assert _rerun(run, scans, out, "--save-probabilities") == {"code": 0, "a": "skipped", "b": "skipped"}


def test_overwrite_removes_outputs_the_new_settings_no_longer_write(setup) -> None:
    # The earlier run's probabilities stayed beside a mask from other settings, their argmax disagreeing.
    run, scans, out = setup
    assert _rerun(run, scans, out, "--overwrite", "--no-tta") == {"code": 0, "a": "ok", "b": "ok"}
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a.nii.gz", "b.json", "b.nii.gz", "report.json"]


def test_a_sidecar_shaped_wrong_is_unreadable_not_an_internal_error(setup, capsys) -> None:
    run, scans, out = setup
    sidecar = json.loads((out / "a.json").read_text())
    (out / "a.json").write_text(json.dumps({**sidecar, "outputs": 5}))
    result = _rerun(run, scans, out, "--save-probabilities")
    assert result == {"code": 2, "a": "failed", "b": "skipped"}
    message = next(c for c in json.loads((out / "report.json").read_text())["cases"] if c["case_id"] == "a")["message"]
    assert "outputs exist without a readable provenance file (a.json)" in message


def test_window_settings_are_refused_before_a_model_or_a_folder(tmp_path: Path, capsys) -> None:
    scan = F.write_image(tmp_path / "s.nii.gz", F.image(), AFFINE)
    for option, value, words in (
        ("--overlap", "1.5", "--overlap: overlap out of range"),
        ("--sw-batch-size", "0", "--sw-batch-size"),
    ):
        out = tmp_path / f"out{option}"
        code = main(
            ["infer", "--model", str(tmp_path / "no_model"), "--input", str(scan), "--output", str(out), option, value]
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and words in err[0], err  # before the missing model is even looked at
        assert not out.exists()


def test_an_interrupt_restores_the_earlier_record(setup, monkeypatch) -> None:
    # Ctrl-C before anything was published left a "running" record of the new settings beside the old mask.
    import medgn.infer.case as case

    run, scans, out = setup
    before = (out / "a.json").read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(case, "_segment", interrupted)
    argv = ["infer", "--model", str(run), "--input", str(scans), "--output", str(out), "--overwrite", "--no-tta"]
    assert main(argv) == 130
    assert (out / "a.json").read_bytes() == before


def test_a_named_mask_in_another_format_keeps_the_earlier_mask(tmp_path: Path) -> None:
    # --overwrite of seg.mha after seg.nrrd replaced seg.json's record and deleted seg.nrrd with it.
    run = F.save_run(tmp_path / "run")
    scan = F.write_image(tmp_path / "s.nii.gz", F.image(), AFFINE)
    out = tmp_path / "x"
    base = ["infer", "--model", str(run), "--input", str(scan)]
    assert main([*base, "--output", str(out / "seg.nrrd"), "--save-probabilities"]) == 0
    assert main([*base, "--output", str(out / "seg.mha"), "--overwrite"]) == 0
    assert {"seg.nrrd", "seg.mha", "seg_probabilities.npz"} <= {p.name for p in out.iterdir()}


def test_a_resumed_overwrite_still_removes_the_earlier_probabilities(setup, monkeypatch) -> None:
    # A killed --overwrite run left a "running" record without the earlier outputs: its resume kept
    # the old probabilities beside the new mask for good.
    import medgn.infer.case as case

    run, scans, out = setup
    real = case._segment

    def killed_after_publishing(*args, **kwargs):
        args[9].append("a.nii.gz")  # "published": the record stays "running", as after a kill
        raise RuntimeError("killed")

    monkeypatch.setattr(case, "_segment", killed_after_publishing)
    main(
        [
            "infer",
            "--model",
            str(run),
            "--input",
            str(scans / "a.nii.gz"),
            "--output",
            str(out),
            "--overwrite",
            "--no-tta",
        ]
    )
    assert json.loads((out / "a.json").read_text())["previous_outputs"] == ["a.nii.gz", "a_probabilities.npz"]
    monkeypatch.setattr(case, "_segment", real)
    assert (
        main(["infer", "--model", str(run), "--input", str(scans / "a.nii.gz"), "--output", str(out), "--no-tta"]) == 0
    )
    assert not (out / "a_probabilities.npz").exists() and (out / "b_probabilities.npz").exists()


def test_a_sidecar_with_malformed_warnings_is_unreadable(setup) -> None:
    run, scans, out = setup
    sidecar = json.loads((out / "b.json").read_text())
    (out / "b.json").write_text(json.dumps({**sidecar, "warnings": 5}))
    assert _rerun(run, scans, out, "--save-probabilities") == {"code": 2, "a": "skipped", "b": "failed"}


def test_an_older_record_with_an_output_gone_does_not_predict_over_the_rest(setup) -> None:
    # A sidecar from before output hashes, probabilities deleted to save disk, the mask corrected by
    # hand: the rerun redid the case and the correction was lost.
    run, scans, out = setup
    sidecar = json.loads((out / "a.json").read_text())
    del sidecar["output_sha256"]
    (out / "a.json").write_text(json.dumps(sidecar))
    (out / "a_probabilities.npz").unlink()
    kept = (out / "a.nii.gz").read_bytes()
    assert _rerun(run, scans, out, "--save-probabilities") == {"code": 2, "a": "failed", "b": "skipped"}
    message = next(c for c in json.loads((out / "report.json").read_text())["cases"] if c["case_id"] == "a")["message"]
    assert "cannot be shown unchanged (its record has no sha256): a.nii.gz" in message
    assert (out / "a.nii.gz").read_bytes() == kept


def test_stale_files_of_a_dicom_seg_record_are_matched_by_the_seg() -> None:
    from medgn.infer.case import recorded_outputs

    record = {"outputs": ["scan.seg.dcm", "scan_probabilities.npz"]}
    assert recorded_outputs(record, "scan", "scan.nii.gz") == ["scan.seg.dcm", "scan_probabilities.npz"]
    assert recorded_outputs({"outputs": ["other.nrrd"]}, "scan", "scan.nii.gz") == []


def test_equivalent_spellings_of_the_same_settings_are_the_same_run(setup) -> None:
    # `--largest-component` is `--postprocess lcc`, and `--output-format nifti` is what a .nii.gz scan
    # gets anyway: a rerun spelled the other way was refused as "other settings" (exit 2).
    run, scans, out = setup
    assert _rerun(run, scans, out, "--save-probabilities", "--output-format", "nifti") == {
        "code": 0,
        "a": "skipped",
        "b": "skipped",
    }
    assert _rerun(run, scans, out, "--overwrite", "--largest-component") == {"code": 0, "a": "ok", "b": "ok"}
    assert _rerun(run, scans, out, "--postprocess", "lcc") == {"code": 0, "a": "skipped", "b": "skipped"}
    assert _rerun(run, scans, out, "--postprocess", "lcc", "--output-format", "nifti") == {
        "code": 0,
        "a": "skipped",
        "b": "skipped",
    }
    # Settings that change the mask are still another run.
    assert _rerun(run, scans, out, "--postprocess", "none") == {"code": 2, "a": "failed", "b": "failed"}


def test_a_record_of_an_earlier_version_spelled_as_asked_is_still_recognised(setup) -> None:
    # Sidecars written before the spellings were made one recorded `largest_component` as the option
    # said it (false for `--postprocess lcc`) and an explicit default `--output-format`.
    import medgn.infer.case as case_mod

    run, scans, out = setup
    assert _rerun(run, scans, out, "--overwrite", "--postprocess", "lcc", "--output-format", "nifti") == {
        "code": 0,
        "a": "ok",
        "b": "ok",
    }
    for name in ("a", "b"):
        sidecar = json.loads((out / f"{name}.json").read_text())
        old = {**sidecar["settings"], "largest_component": False, "output_format": "nifti"}
        hashes = [i["sha256"] for i in sidecar["inputs"]]
        models = [m["sha256"] for m in sidecar["models"]]
        sidecar["fingerprint"] = case_mod.fingerprint(hashes, models, sidecar["config_hash"], old)
        (out / f"{name}.json").write_text(json.dumps(sidecar))
    assert _rerun(run, scans, out, "--postprocess", "lcc", "--output-format", "nifti") == {
        "code": 0,
        "a": "skipped",
        "b": "skipped",
    }
