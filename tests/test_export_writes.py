"""``medgn export`` writing its file: a full disk, an unwritable folder and a non-regular ``--out``.

A full disk is exit 5 naming the output file with nothing at its path (no temporary file either);
a folder that cannot be written and an existing FIFO or device node (even with ``--overwrite``) are
exit 2 naming ``--out``, before the model is loaded. The disk is never really filled: the package's
file writer is patched to fail the way a full disk fails.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import torch

import medgn.files
import medgn.infer.predictor
from medgn.checkpoint import save_checkpoint
from medgn.cli import main
from medgn.configtools import build
from medgn.export import export_module
from medgn.files import TEMP_MARK
from medgn.models.config import UNet3DConfig
from medgn.models.registry import build_model

pytest.importorskip("onnx", reason="medgn export needs the 'export' extra (onnx, onnxruntime)")
pytest.importorskip("onnxruntime", reason="medgn export needs the 'export' extra (onnx, onnxruntime)")

STRIDES = [[1, 1, 1], [2, 2, 2]]  # the smallest U-Net: two levels, total stride 2
KERNELS = [[3, 3, 3]] * 2
PLAN = {
    "version": 1, "in_channels": 1, "num_classes": 2, "label_values": [0, 1], "target_spacing": [1.0, 1.0, 1.0],
    "normalization": [{"scheme": "zscore"}], "patch_size": [8, 8, 8], "batch_size": 1,
    "network": {"strides": STRIDES, "kernel_sizes": KERNELS},
}  # fmt: skip
CONFIG = {"model": {"features": [4, 8], "num_groups": 2, "deep_supervision": False}}
FORMATS = [("m.onnx", "onnx"), ("m.pt", "torchscript")]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = build_model(build(UNet3DConfig, CONFIG["model"], "model"), 1, 2, STRIDES, KERNELS)
    run = tmp_path_factory.mktemp("run")
    state = {"model": net.state_dict(), "config": CONFIG, "plan": PLAN, "counters": {"epoch": 1, "iteration": 1}}
    save_checkpoint(state, run / "checkpoints", tag="epoch", pointers=("latest", "best"))
    return run


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if the command loads the model: these refusals come first."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(medgn.infer.predictor, "load_predictor", refuse)


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medgn: error: "), err
    return err[0]


def _temps(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"{TEMP_MARK}*"))


def _failing_writer(code: int) -> Any:
    """A stand-in for the package's byte writer that writes half, then fails with ``code``."""

    def write(path: Path, data: bytes) -> None:
        path.write_bytes(data[: len(data) // 2])
        raise OSError(code, os.strerror(code))

    return write


@pytest.mark.parametrize("earlier", [False, True])
@pytest.mark.parametrize(("name", "fmt"), FORMATS)
def test_a_full_disk_is_exit_5_naming_the_file_and_leaves_nothing(
    name: str,
    fmt: str,
    earlier: bool,
    run_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / name
    if earlier:
        out.write_bytes(b"an earlier export")
    monkeypatch.setattr(medgn.files, "_write_bytes_to", _failing_writer(errno.ENOSPC))
    assert main(["export", "--model", str(run_dir), "--out", str(out), "--overwrite"]) == 5
    line = _one_line(capsys)
    assert "no space left on device" in line and str(out) in line and "unsupported" not in line, line
    assert (out.read_bytes() == b"an earlier export") if earlier else not os.path.lexists(out)
    assert _temps(tmp_path) == []


@pytest.mark.parametrize(("name", "fmt"), FORMATS)
def test_other_write_failures_are_usage_errors_naming_the_file(
    name: str,
    fmt: str,
    run_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / name
    monkeypatch.setattr(medgn.files, "_write_bytes_to", _failing_writer(errno.EROFS))
    assert main(["export", "--model", str(run_dir), "--out", str(out)]) == 2
    line = _one_line(capsys)
    assert str(out) in line and os.strerror(errno.EROFS) in line, line
    assert not os.path.lexists(out) and _temps(tmp_path) == []


def test_an_os_error_inside_the_exporter_is_not_an_unsupported_operator(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch.onnx, "export", full)
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", str(run_dir), "--out", str(out)]) == 5
    line = _one_line(capsys)
    assert "unsupported" not in line and os.strerror(errno.ENOSPC) in line, line
    assert not os.path.lexists(out) and _temps(tmp_path) == []


def test_a_full_disk_seen_by_the_folder_probe_is_exit_5_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_loading: None, capsys: pytest.CaptureFixture[str]
) -> None:
    real = Path.write_bytes

    def full(self: Path, data: Any) -> int:
        if self.name.startswith(TEMP_MARK):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", str(tmp_path / "run"), "--out", str(out)]) == 5
    line = _one_line(capsys)
    assert "no space left on device" in line and str(out) in line, line
    assert list(tmp_path.iterdir()) == []


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _link_to_fifo(path: Path) -> None:
    os.mkfifo(path.with_name("fifo"))
    path.symlink_to(path.with_name("fifo"))


def _dangling_link(path: Path) -> None:
    path.symlink_to(path.with_name("nowhere"))


def _null_device(path: Path) -> None:
    try:  # a character device like /dev/null (1, 3), made in the test's folder
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs CAP_MKNOD")


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
@pytest.mark.parametrize("make", [_fifo, _link_to_fifo, _dangling_link, _null_device])
def test_an_existing_path_that_is_not_a_regular_file_is_never_replaced(
    make: Any, overwrite: list[str], tmp_path: Path, no_loading: None, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.onnx"
    make(out)
    before = os.lstat(out)
    assert main(["export", "--model", str(tmp_path / "run"), "--out", str(out), *overwrite]) == 2
    line = _one_line(capsys)
    assert str(out) in line and "only a regular file is replaced" in line, line
    after = os.lstat(out)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
    assert _temps(tmp_path) == []


def test_the_python_api_refuses_a_fifo_too(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    os.mkfifo(out)
    with pytest.raises(Exception) as info:
        export_module(torch.nn.Conv3d(1, 2, 3, padding=1), 1, out, overwrite=True, example_size=(4, 4, 4))
    assert getattr(info.value, "code", None) == 2 and str(out) in str(info.value)
    assert stat.S_ISFIFO(os.lstat(out).st_mode)


def _proc_is_unwritable() -> bool:
    try:
        (Path("/proc") / f"{TEMP_MARK}probe").write_bytes(b"")
    except OSError:
        return True
    return False


@pytest.mark.skipif(not Path("/proc").is_dir() or not _proc_is_unwritable(), reason="needs Linux's /proc")
def test_a_folder_that_cannot_be_written_is_refused_before_loading(
    tmp_path: Path, no_loading: None, capsys: pytest.CaptureFixture[str]
) -> None:
    out = Path("/proc") / "medgn-export-test.onnx"  # a folder that exists; no file can be made in it
    assert main(["export", "--model", str(tmp_path / "run"), "--out", str(out)]) == 2
    line = _one_line(capsys)
    assert str(out) in line and "not writable" in line and "unsupported" not in line, line


def test_a_folder_that_is_a_file_is_refused_before_loading(
    tmp_path: Path, no_loading: None, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    out = tmp_path / "notes.txt" / "m.onnx"
    assert main(["export", "--model", str(tmp_path / "run"), "--out", str(out)]) == 2
    line = _one_line(capsys)
    assert str(out) in line and "output folder is a file" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_the_models_own_checkpoint_is_never_replaced(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--out`` the checkpoint being exported, with --overwrite, replaced the trained run (exit 0)."""
    import shutil

    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    own = next((run / "checkpoints").glob("*.pt"))
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    for out, words in (
        (own, "would replace the model's own checkpoint"),
        (run / "checkpoints" / "latest.json.pt", "is inside the model's checkpoints folder"),
        (run / "checkpoints" / ".." / "checkpoints" / own.name, "would replace the model's own checkpoint"),
    ):
        assert main(["export", "--model", str(run), "--out", str(out), "--overwrite"]) == 2
        assert words in _one_line(capsys)
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before
    assert main(["export", "--model", str(run), "--out", str(run / "model.onnx")]) == 0  # the run folder is fine
