"""Faults injected into real ``medgn`` processes: signals, a full disk, two runs, NaN losses.

Training: one run is stopped five times in five ways (SIGTERM mid-step, SIGKILL mid-step, a full
disk during a checkpoint save, SIGKILL inside a checkpoint save, SIGINT mid-step), resumed after
each, and must end with the same weights and optimizer state, bit for bit, as an uninterrupted run
(CPU, one thread). Inference: a run is frozen inside a mask write, a second run on the same folder
is refused with code 6, the first is killed, and a rerun takes over its stale lock, skips the
finished case, redoes the interrupted one and matches an uninterrupted run; a full disk during one
case's write exits 5 naming the file and leaves earlier outputs byte-identical. Faults are injected
by running the CLI through a ``python -c`` wrapper that patches medgn first (no test-only code in
medgn).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medgn.checkpoint import file_sha256, load_checkpoint, read_pointer
from medgn.files import LOCK_NAME
from tests.reliability.conftest import (
    Result,
    assert_clean_failure,
    child_env,
    cli,
    image_array,
    make_msd,
    medgn_cmd,
    run_medgn,
    temp_files,
    tree_hashes,
    truncate,
    write_nifti,
)
from tests.tiny_config import tiny_sets

TRAIN = [
    *tiny_sets(
        {
            "train.optimizer": "adamw",
            "train.lr": "0.01",
            "train.val_every": "0",
            "train.log_every": "1",
            "train.checkpoint_every_minutes": "0",
            "train.checkpoint_every_steps": "2",
            "train.epochs": "2",
        }
    ),
    "--set",
    "train.iters_per_epoch=5",
    "--set",
    "train.deterministic=true",
    "--no-progress",
    "--device",
    "cpu",
]

# Send signal SIG to this process while the step of iteration AT is computing its loss.
SIGNAL_IN_STEP = """
import os
from medgn.train import trainer as _t
_forward = _t.Trainer._forward_loss
def _patched(self, batch):
    if self.state.iteration == {at}:
        os.kill(os.getpid(), {sig})
    return _forward(self, batch)
_t.Trainer._forward_loss = _patched
"""

# SIGKILL inside the save of checkpoint iteration AT: the temporary file is complete, not renamed.
KILL_IN_SAVE = """
import os, signal
from medgn import checkpoint as _c
_sha = _c.file_sha256
def _patched(path):
    if ".medgn-tmp-" in str(path) and "-i{at:07d}-" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)
    return _sha(path)
_c.file_sha256 = _patched
"""

# The disk fills up while the file whose name contains NEEDLE is written (caught at its fsync).
DISK_FULL = """
import errno, os
import medgn.files as _f
_fsync = _f._fsync_file
def _patched(path):
    if ".medgn-tmp-" in str(path) and {needle!r} in str(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return _fsync(path)
_f._fsync_file = _patched
"""


def _train(data: Path, out: Path, *extra: str, pre: str = "") -> Result:
    return run_medgn(["train", "--data", data, "--out", out, *TRAIN, *extra], pre=pre)


def _pointed(run: Path) -> dict[str, str]:
    """Every checkpoint a pointer names, verified: it loads (sha256 checked) and is finite."""
    folder = run / "checkpoints"
    files = {}
    for name in ("latest", "best", "final"):
        record = read_pointer(folder, name)
        if record:
            load_checkpoint(folder / f"{name}.json")  # raises on a damaged or non-finite file
            files[name] = record["file"]
    return files


@pytest.fixture(scope="module")
def train_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_msd(tmp_path_factory.mktemp("train") / "ds", 4, shape=(20, 20, 20))


def test_training_survives_five_interruptions_bit_exact(train_data: Path, tmp_path: Path) -> None:
    before = {train_data: tree_hashes(train_data)}
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert (r := _train(train_data, ref)).code == 0, r.err

    r = _train(train_data, run, pre=SIGNAL_IN_STEP.format(at=1, sig=int(signal.SIGTERM)))
    assert r.code == 143, r.err  # SIGTERM: the step finished, a checkpoint was written
    assert read_pointer(run / "checkpoints", "latest")["iteration"] == 2
    _pointed(run)

    r = _train(train_data, run, "--resume", pre=SIGNAL_IN_STEP.format(at=3, sig=int(signal.SIGKILL)))
    assert r.code == -signal.SIGKILL, r.err
    assert read_pointer(run / "checkpoints", "latest")["iteration"] == 2

    previous = {name: file_sha256(run / "checkpoints" / f) for name, f in _pointed(run).items()}
    r = _train(train_data, run, "--resume", pre=DISK_FULL.format(needle="-i0000004-"))
    assert_clean_failure(r, 5, ["i0000004", ".pt"], ["no space left"], outputs=[run / "checkpoints"])
    assert {name: file_sha256(run / "checkpoints" / f) for name, f in _pointed(run).items()} == previous
    assert not list((run / "checkpoints").glob("*i0000004*"))

    r = _train(train_data, run, "--resume", pre=KILL_IN_SAVE.format(at=6))
    assert r.code == -signal.SIGKILL, r.err
    assert temp_files(run / "checkpoints"), "the kill should have hit a complete, unrenamed temp file"
    assert read_pointer(run / "checkpoints", "latest")["iteration"] < 6  # the epoch-end one (5)
    _pointed(run)

    r = _train(train_data, run, "--resume", pre=SIGNAL_IN_STEP.format(at=7, sig=int(signal.SIGINT)))
    assert r.code == 130, r.err
    assert read_pointer(run / "checkpoints", "latest")["iteration"] == 8

    r = _train(train_data, run, "--resume")
    assert r.code == 0, r.err
    assert not temp_files(run) and not (run / LOCK_NAME).exists()
    a, b = load_checkpoint(ref / "checkpoints" / "final.json"), load_checkpoint(run / "checkpoints" / "final.json")
    assert a["counters"]["iteration"] == b["counters"]["iteration"] == 10
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        for key in pa:
            assert torch.equal(torch.as_tensor(pa[key]), torch.as_tensor(pb[key])), key
    for name, hashes in before.items():
        assert tree_hashes(name) == hashes
    # A resume against data that went bad is refused before training; the checkpoints stay as they are.
    bad = Path(shutil.copytree(train_data, tmp_path / "bad"))
    truncate(bad / "imagesTr" / "c2.nii.gz")
    finished = tree_hashes(run / "checkpoints")
    r = _train(bad, run, "--resume", "--set", "train.epochs=3")
    assert_clean_failure(r, 3, [bad / "imagesTr" / "c2.nii.gz"], ["truncated"])
    assert tree_hashes(run / "checkpoints") == finished


# Losses of the steps in BAD are NaN (the first two are isolated, then K in a row).
NAN_LOSS = """
from medgn.train import trainer as _t
_forward = _t.Trainer._forward_loss
def _patched(self, batch):
    loss = _forward(self, batch)
    return loss * float("nan") if self.state.iteration in {bad} else loss
_t.Trainer._forward_loss = _patched
"""


def test_non_finite_losses_are_skipped_counted_then_stop_with_case_ids(train_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = _train(
        train_data,
        run,
        "--set",
        "train.max_nonfinite_in_row=3",
        "--set",
        "train.amp=bf16",
        pre=NAN_LOSS.format(bad={1, 3, 5, 6, 7}),
    )
    text = assert_clean_failure(r, 5, ["train.max_nonfinite_in_row"], ["3 steps in a row", "cases: c"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = {rec["iteration"]: rec for rec in records if rec.get("kind") == "step"}
    # Step records carry the count after the step: iterations 1 and 3 (0-based) were skipped.
    assert [steps[i]["loss"] is None for i in (1, 2, 3, 4, 5)] == [False, True, False, True, False], steps
    assert [steps[i]["skipped_total"] for i in (1, 2, 3, 4, 5)] == [0, 1, 1, 2, 2]
    assert text.count("cases: ") == 1
    load_checkpoint(run / "checkpoints" / "latest.json")  # finite: the loader refuses NaN weights
    for path in (run / "checkpoints").glob("*.pt"):
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point()), path


# Freeze inside the N-th mask write (temporary file complete, not yet renamed), after a marker.
FREEZE_IN_WRITE = """
import os, time
from medgn.data import io as _io
_write = _io._write
_calls = []
def _patched(*args, **kwargs):
    _write(*args, **kwargs)
    _calls.append(1)
    if len(_calls) == {n}:
        open({marker!r}, "w").close()
        while True:
            time.sleep(0.05)
_io._write = _patched
"""


def _masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asanyarray(nib.load(p).dataobj) for p in sorted(folder.glob("*.nii.gz"))}


def _three_scans(folder: Path) -> Path:
    folder.mkdir()
    for i, name in enumerate(("a", "b", "c")):
        write_nifti(folder / f"{name}.nii.gz", image_array(seed=i) * (1 + i))
    return folder


def test_two_runs_on_one_folder_then_kill_and_rerun(
    tmp_path: Path, model_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = _three_scans(tmp_path / "in")
    before = {inputs: tree_hashes(inputs)}
    assert (
        cli(
            ["infer", "--model", model_run, "--input", inputs, "--output", tmp_path / "ref", "--no-progress"], capsys
        ).code
        == 0
    )
    out, marker = tmp_path / "out", tmp_path / "frozen"
    argv = ["infer", "--model", model_run, "--input", inputs, "--output", out, "--no-progress"]
    first = subprocess.Popen(
        medgn_cmd(argv),
        env=child_env(FREEZE_IN_WRITE.format(n=2, marker=str(marker))),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 180  # a deadline for a hung child, not a timing assertion
        while not marker.exists():
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the first run never reached its second write"
            time.sleep(0.05)
        second = run_medgn(argv)
        assert_clean_failure(second, 6, [str(out)], ["in use by another medgn run", f"pid {first.pid}"])
    finally:
        first.kill()
        first.wait(timeout=60)
    assert (out / "a.nii.gz").is_file() and not (out / "b.nii.gz").exists()
    assert temp_files(out) and (out / LOCK_NAME).exists()  # what a crash mid-write leaves
    rerun = run_medgn(argv)
    assert rerun.code == 0, rerun.err
    report = json.loads((out / "report.json").read_text())
    assert {c["case_id"]: c["status"] for c in report["cases"]} == {"a": "skipped", "b": "ok", "c": "ok"}
    assert not temp_files(out) and not (out / LOCK_NAME).exists()
    ref, got = _masks(tmp_path / "ref"), _masks(out)
    assert list(ref) == list(got) == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]
    for name in ref:
        np.testing.assert_array_equal(ref[name], got[name])
        np.testing.assert_array_equal(nib.load(tmp_path / "ref" / name).affine, nib.load(out / name).affine)
    assert tree_hashes(inputs) == before[inputs]


def test_disk_full_during_a_case_keeps_earlier_outputs(
    tmp_path: Path, model_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = _three_scans(tmp_path / "in")
    (inputs / "b.nii.gz").rename(tmp_path / "b.nii.gz")
    (inputs / "c.nii.gz").rename(tmp_path / "c.nii.gz")
    out = tmp_path / "out"
    argv = ["infer", "--model", model_run, "--input", inputs, "--output", out, "--no-progress"]
    assert cli(argv, capsys).code == 0
    earlier = {k: v for k, v in tree_hashes(out).items() if k != "report.json"}
    for name in ("b.nii.gz", "c.nii.gz"):
        (tmp_path / name).rename(inputs / name)
    before = {inputs: tree_hashes(inputs)}
    result = run_medgn(argv, pre=DISK_FULL.format(needle="-b.nii.gz"))
    assert_clean_failure(
        result,
        5,
        [str(out / "b.nii.gz")],
        ["no space left on device"],
        outputs=[out / "b.nii.gz", out / "b.json", out],
        before=before,
    )
    now = tree_hashes(out)
    assert {k: now[k] for k in earlier} == earlier  # a's mask and sidecar byte-identical
    assert "c.nii.gz" in now  # the run went on past the failed case
    report = json.loads((out / "report.json").read_text())
    assert {c["case_id"]: (c["status"], c["code"]) for c in report["cases"]} == {
        "a": ("skipped", None),
        "b": ("failed", 5),
        "c": ("ok", None),
    }


def _oom_then(after: BaseException | None) -> object:
    """A ``_window_logits`` that runs out of memory once, then raises ``after`` (or works)."""
    from medgn.infer import sliding_window

    original, calls = sliding_window._window_logits, []

    def patched(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if after is not None:
            raise after
        return original(*args, **kwargs)

    return patched


@pytest.mark.parametrize(
    ("after", "code", "words"),
    [
        (None, 0, []),
        (torch.OutOfMemoryError("CUDA out of memory again"), 5, ["out of memory"]),
        (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"), 1, ["internal error: RuntimeError: cuDNN error"]),
    ],
    ids=["fallback", "oom-twice", "other-error"],
)
def test_out_of_memory_falls_back_only_for_out_of_memory(
    tmp_path: Path,
    model_run: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    after: BaseException | None,
    code: int,
    words: list[str],
) -> None:
    from medgn.infer import sliding_window

    scan = write_nifti(tmp_path / "scan.nii.gz", image_array())
    monkeypatch.setattr(sliding_window, "_window_logits", _oom_then(after))
    out = tmp_path / "out"
    result = cli(["infer", "--model", model_run, "--input", scan, "--output", out, "--no-progress"], capsys)
    if code == 0:
        assert result.code == 0, result.err
        sidecar = json.loads((out / "scan.json").read_text())
        assert "stitching moved to the CPU" in sidecar["warnings"][0]
    else:
        assert_clean_failure(result, code, ["case scan"], words, outputs=[out / "scan.nii.gz", out / "scan.json", out])
