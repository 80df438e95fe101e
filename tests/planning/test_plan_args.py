"""Tests for the integer options of ``medgn plan`` and ``medgn verify``: a bad value is a usage error
(exit 2) naming the option, before any file is read or written."""

from __future__ import annotations

from pathlib import Path

import pytest

from medgn.cli import main
from medgn.logs import detach_file_logs
from tests.data.conftest import make_nnunet


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("--seed", "-1", "--seed: seed must not be negative (got -1"),
        ("--folds", "1", "--folds: cross-validation needs at least 2 folds"),
        ("--folds", "-3", "--folds: cross-validation needs at least 2 folds"),
        ("--max-voxels", "0", "--max-voxels: limit must be positive"),
        ("--max-resampled-voxels", "-5", "--max-resampled-voxels: limit must be positive"),
        ("--max-windows", "-1", "--max-windows: limit must be positive"),
    ],
)
def test_plan_integer_options_out_of_range_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str, words: str
) -> None:
    root = make_nnunet(tmp_path / "ds", n_cases=2, channels=1)
    out = tmp_path / "plan" / "plan.json"
    try:
        code = main(["plan", str(root), "--out", str(out), option, value])
    finally:
        detach_file_logs()
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"medgn: error: {words}") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "plan").exists()


def test_plan_takes_a_large_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_nnunet(tmp_path / "ds", n_cases=2, channels=1)
    try:
        code = main(["plan", str(root), "--out", str(tmp_path / "plan.json"), "--seed", str(2**70)])
    finally:
        detach_file_logs()
    assert code == 0 and (tmp_path / "splits.json").is_file(), capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value"), [("--max-voxels", "0"), ("--max-dim", "-2"), ("--max-resampled-voxels", "0")]
)
def test_verify_integer_options_out_of_range_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str
) -> None:
    root = make_nnunet(tmp_path / "ds", n_cases=2, channels=1)
    try:
        code = main(["verify", str(root), option, value])
    finally:
        detach_file_logs()
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"medgn: error: {option}: limit must be positive")


def test_concurrent_plans_into_one_folder_do_not_mix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two plans at once into one folder: one wrote 4 folds into a splits.json another asked 2 of."""
    import medgn.commands.plan as plan_command
    from medgn.files import RunLock

    root = make_nnunet(tmp_path / "ds", n_cases=4, channels=1)
    out = tmp_path / "plans" / "plan.json"
    out.parent.mkdir()
    with RunLock(out.parent, purpose="another plan"):
        try:
            assert main(["plan", str(root), "--out", str(out), "--folds", "2"]) == 6
        finally:
            detach_file_logs()
    assert "in use by another medgn run" in capsys.readouterr().err and not out.exists()
    fingerprint = plan_command.compute_fingerprint

    def meanwhile(*args: object, **kwargs: object) -> object:  # another plan finishes, with 3 folds
        result = fingerprint(*args, **kwargs)
        monkeypatch.setattr(plan_command, "compute_fingerprint", fingerprint)
        assert main(["plan", str(root), "--out", str(tmp_path / "plans" / "other.json"), "--folds", "3"]) == 0
        return result

    monkeypatch.setattr(plan_command, "compute_fingerprint", meanwhile)
    try:
        code = main(["plan", str(root), "--out", str(out), "--folds", "2"])
    finally:
        detach_file_logs()
    assert code == 2 and "already holds 3 folds" in capsys.readouterr().err and not out.exists()
