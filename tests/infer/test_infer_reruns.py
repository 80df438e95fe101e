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


def test_a_rerun_redoes_what_was_deleted_or_damaged_and_skips_the_rest(setup, capsys) -> None:
    run, scans, out = setup
    sidecar = json.loads((out / "a.json").read_text())
    assert set(sidecar["output_sha256"]) == {"a.nii.gz", "a_probabilities.npz"}
    assert _rerun(run, scans, out, "--save-probabilities") == {"code": 0, "a": "skipped", "b": "skipped"}
    (out / "a.nii.gz").unlink()  # the mask alone deleted: was refused as "another model" (exit 2)
    (out / "b_probabilities.npz").write_bytes(b"damaged")  # was skipped as done
    assert _rerun(run, scans, out, "--save-probabilities") == {"code": 0, "a": "ok", "b": "ok"}
    assert (out / "a.nii.gz").is_file() and (out / "b_probabilities.npz").stat().st_size > 100
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
