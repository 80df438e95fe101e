"""Hostile and damaged checkpoints through ``medgn infer``: refused with code 4, nothing executed.

A checkpoint whose pickle runs a shell command when loaded (also with
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``, which torch only honours when ``weights_only`` is not passed
explicitly), truncated files with and without a recorded sha256, weights for another number of
classes or channels (a diff of expected vs found shapes), NaN weights, a model for two channels
applied to a one-channel scan.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from medgn.checkpoint import FORMAT, FORMAT_VERSION, file_sha256, save_checkpoint
from tests.reliability.conftest import (
    assert_clean_failure,
    cli,
    image_array,
    model_state,
    run_medgn,
    tree_hashes,
    write_nifti,
)


class _RunsCode:
    """Unpickling this calls ``os.system(command)``: what a malicious checkpoint does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.command,))


def _malicious_run(root: Path, marker: Path) -> Path:
    """A run folder whose best checkpoint (with a matching sha256) carries a code payload."""
    folder = root / "checkpoints"
    folder.mkdir(parents=True)
    state = {"format": FORMAT, "format_version": FORMAT_VERSION, **model_state()}
    state["model"]["payload"] = _RunsCode(f"touch '{marker}'")
    path = folder / "e0001-i0000001-epoch.pt"
    torch.save(state, path)
    sha = file_sha256(path)
    (folder / (path.name + ".sha256")).write_text(f"{sha}  {path.name}\n")
    for pointer in ("best", "latest"):
        (folder / f"{pointer}.json").write_text(f'{{"file": "{path.name}", "sha256": "{sha}"}}')
    return root


@pytest.fixture
def scan(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    return write_nifti(folder / "scan.nii.gz", image_array())


@pytest.mark.parametrize("force_no_weights_only", [False, True], ids=["plain", "env-forces-unsafe"])
def test_checkpoint_that_runs_code_is_refused(tmp_path: Path, scan: Path, force_no_weights_only: bool) -> None:
    marker = tmp_path / "pwned"
    run = _malicious_run(tmp_path / "evil", marker)
    before = {run: tree_hashes(run), scan.parent: tree_hashes(scan.parent)}
    env = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"} if force_no_weights_only else {}
    out = tmp_path / "out"
    result = run_medgn(["infer", "--model", run, "--input", scan, "--output", out, "--no-progress"], **env)
    assert_clean_failure(
        result,
        4,
        ["e0001-i0000001-epoch.pt"],
        ["cannot load checkpoint safely"],
        outputs=[out / "scan.nii.gz", out / "scan.json", out],
        before=before,
    )
    assert not marker.exists(), "the checkpoint's code ran"
    if not force_no_weights_only:  # what the safe loader refused, without torch's paragraph on weights_only
        assert "refused by the safe loader" in result.err and "system" in result.err
        assert "PyTorch 2.6" not in result.err


def test_a_file_that_is_no_checkpoint_is_named_as_such(
    tmp_path: Path, scan: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, data in (("config.yaml", b"model:\n  norm: group\n"), ("empty.pt", b""), ("notes.pt", b"garbage")):
        path = tmp_path / name
        path.write_bytes(data)
        out = tmp_path / "out"
        result = cli(["infer", "--model", path, "--input", scan, "--output", out, "--no-progress"], capsys)
        assert_clean_failure(result, 4, [path], ["not a PyTorch checkpoint"], outputs=[out / "scan.nii.gz", out])


def test_truncated_checkpoint(tmp_path: Path, scan: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = save_checkpoint(model_state(), tmp_path / "run" / "checkpoints", pointers=("latest", "best"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    result = cli(["infer", "--model", tmp_path / "run", "--input", scan, "--output", out, "--no-progress"], capsys)
    assert_clean_failure(result, 4, [path], ["does not match its recorded sha256"], outputs=[out / "scan.nii.gz", out])
    path.with_name(path.name + ".sha256").unlink()  # no record: the loader itself must refuse it
    result = cli(["infer", "--model", path, "--input", scan, "--output", out, "--no-progress"], capsys)
    assert_clean_failure(result, 4, [path], ["cannot load checkpoint safely"], outputs=[out / "scan.nii.gz", out])


def _mismatched(root: Path, key: str) -> Path:
    state = model_state()
    if key == "classes":
        state["plan"].update(num_classes=3, label_values=[0, 1, 2])
    elif key == "channels":
        state["plan"].update(in_channels=2, normalization=[{"scheme": "zscore"}] * 2)
    else:
        state["model"] = {k: v.clone() for k, v in state["model"].items()}
        next(v for v in state["model"].values() if v.is_floating_point())[..., 0] = float("nan")
        path = root / "checkpoints" / "nan.pt"
        path.parent.mkdir(parents=True)
        torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **state}, path)  # save_checkpoint refuses NaN
        return path
    return save_checkpoint(state, root / "checkpoints", pointers=("latest", "best"))


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ("classes", ["heads.0.weight: expected (3, 4, 1, 1, 1), found (2, 4, 1, 1, 1)", "num_classes=3"]),
        ("channels", ["encoder.0.0.conv.weight: expected (4, 2, 3, 3, 3), found (4, 1, 3, 3, 3)", "in_channels=2"]),
        ("nan", ["non-finite weights"]),
    ],
)
def test_weights_that_do_not_fit_are_refused_with_a_diff(
    tmp_path: Path, scan: Path, capsys: pytest.CaptureFixture[str], key: str, words: list[str]
) -> None:
    path = _mismatched(tmp_path / "run", key)
    before = {path.parent: tree_hashes(path.parent)}
    out = tmp_path / "out"
    result = cli(["infer", "--model", path, "--input", scan, "--output", out, "--no-progress"], capsys)
    assert_clean_failure(result, 4, [path], words, outputs=[out / "scan.nii.gz", out], before=before)


def test_model_for_two_channels_on_a_one_channel_scan(
    tmp_path: Path, scan: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_checkpoint(model_state(in_channels=2), tmp_path / "run" / "checkpoints", pointers=("latest", "best"))
    out = tmp_path / "out"
    result = cli(["infer", "--model", tmp_path / "run", "--input", scan, "--output", out, "--no-progress"], capsys)
    assert_clean_failure(
        result, 3, [scan], ["1 channel(s)", "expected 2 channel(s)"], outputs=[out / "scan.nii.gz", out / "scan.json"]
    )
