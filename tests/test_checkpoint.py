"""Checkpoints: data-only contents, safe loading, damaged files refused with code 4, RNG round trip."""

from __future__ import annotations

import errno
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from medgn.checkpoint import check_data_only, load_checkpoint, read_pointer, save_checkpoint
from medgn.errors import EXIT_MODEL, ModelError, ResourceError
from medgn.train.rng import capture_rng, restore_rng


def _state(iteration: int, value: float = 1.0) -> dict:
    model = {"w": torch.full((3, 2), value), "b": torch.zeros(2)}
    return {
        "model": model,
        "optimizer": {"state": {0: {"momentum_buffer": torch.ones(2)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "counters": {"epoch": 0, "iteration": iteration},
        "rng": [capture_rng()],
        "plan": {"spacing": [1.0, 1.0, 2.5]},
    }


def test_save_load_roundtrip_with_weights_only(tmp_path: Path) -> None:
    path = save_checkpoint(_state(3, 2.0), tmp_path, pointers=("latest", "best"))
    raw = torch.load(path, weights_only=True)  # the plain safe loader reads it
    assert torch.equal(raw["model"]["w"], torch.full((3, 2), 2.0))
    assert raw["format"] == "medgn-checkpoint"
    sidecar = path.with_name(path.name + ".sha256").read_text().split()
    assert sidecar[1] == path.name and read_pointer(tmp_path, "latest")["sha256"] == sidecar[0]
    for ref in (path, tmp_path, tmp_path / "best.json"):
        assert torch.equal(load_checkpoint(ref)["model"]["w"], raw["model"]["w"])


def test_pruning_keeps_pointed_files(tmp_path: Path) -> None:
    save_checkpoint(_state(1), tmp_path, pointers=("latest", "best"), keep=1)
    for it in (2, 3, 4):
        save_checkpoint(_state(it), tmp_path, pointers=("latest",), keep=1)
    names = sorted(p.name for p in tmp_path.glob("*.pt"))
    assert names == ["e0000-i0000001-step.pt", "e0000-i0000003-step.pt", "e0000-i0000004-step.pt"]
    assert read_pointer(tmp_path, "best")["file"] == "e0000-i0000001-step.pt"
    assert all(torch.load(p, weights_only=True)["counters"]["iteration"] > 0 for p in tmp_path.glob("*.pt"))


@pytest.mark.parametrize("bad", [np.zeros(2), {"x": Path("a")}, {(1, 2): 3}])
def test_only_tensors_and_plain_values_go_in(bad: object) -> None:
    with pytest.raises(TypeError, match="cannot go into a checkpoint"):
        check_data_only({"model": {}, "extra": bad})


def test_non_finite_weights_are_never_written(tmp_path: Path) -> None:
    state = _state(1)
    state["model"]["w"][0, 0] = float("nan")
    with pytest.raises(ModelError, match="non-finite") as info:
        save_checkpoint(state, tmp_path)
    assert info.value.code == EXIT_MODEL and "model.w" in str(info.value)
    assert not list(tmp_path.glob("*.pt")) and read_pointer(tmp_path) is None


class _Exploit:
    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _write_exploit(path: Path) -> Path:
    marker = path.with_name("pwned")
    exploit = _Exploit()
    exploit.marker = marker  # type: ignore[attr-defined]
    torch.save({"format": "medgn-checkpoint", "model": exploit}, path)
    return marker


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"format_version": "abc"}, "invalid checkpoint format_version"),
        ({"format_version": None}, "invalid checkpoint format_version"),
        ({"sparse": True}, "not dense real tensors"),
        ({"complex": True}, "not dense real tensors"),
    ],
)
def test_checkpoints_with_odd_versions_or_tensors_are_model_errors(tmp_path: Path, change: dict, words: str) -> None:
    state = {"format": "medgn-checkpoint", "format_version": 1, **_state(5)}
    if change.pop("sparse", False):
        state["model"]["w"] = state["model"]["w"].to_sparse()
    if change.pop("complex", False):
        state["model"]["w"] = state["model"]["w"].to(torch.complex64)
    state.update(change)
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(ModelError, match="") as info:
        load_checkpoint(tmp_path / "odd.pt")
    assert info.value.code == EXIT_MODEL and words in str(info.value) and "odd.pt" in str(info.value)


def test_a_hash_file_that_is_not_text_is_a_model_error(tmp_path: Path) -> None:
    path = save_checkpoint(_state(5), tmp_path)
    path.with_name(path.name + ".sha256").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ModelError, match="unreadable checkpoint hash file") as info:
        load_checkpoint(path)
    assert info.value.code == EXIT_MODEL


@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "code", "foreign", "flipped_byte"])
def test_damaged_checkpoints_are_refused_naming_the_file(tmp_path: Path, damage: str) -> None:
    good = save_checkpoint(_state(5), tmp_path)
    data = good.read_bytes()
    target = tmp_path / "bad.pt"
    marker = None
    if damage == "truncated":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "random":
        target.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "empty":
        target.write_bytes(b"")
    elif damage == "code":
        marker = _write_exploit(target)
    elif damage == "foreign":
        torch.save({"weights": torch.ones(1)}, target)
    else:  # a flipped byte in the file the latest pointer names: the sha256 catches it
        target = good
        target.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    with pytest.raises(ModelError) as info:
        load_checkpoint(tmp_path if damage == "flipped_byte" else target)
    assert info.value.code == EXIT_MODEL and str(target) in str(info.value)
    if marker is not None:
        assert not marker.exists(), "unpickling ran code"


def test_disk_full_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint(_state(1, 3.0), tmp_path)

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(ResourceError) as info:
        save_checkpoint(_state(2, 4.0), tmp_path)
    assert info.value.code == 5
    monkeypatch.undo()
    assert json.loads((tmp_path / "latest.json").read_text())["iteration"] == 1
    assert torch.equal(load_checkpoint(tmp_path)["model"]["w"], torch.full((3, 2), 3.0))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".medgn-tmp-")] == []


def test_a_full_disk_reported_by_torch_as_a_runtime_error_is_a_resource_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.save's zip writer reports a short write as RuntimeError("unexpected pos ..."), not ENOSPC."""
    import shutil

    import medgn.files

    save_checkpoint(_state(1, 3.0), tmp_path)

    def short_write(obj: object, f: object, *args: object, **kwargs: object) -> None:
        Path(f).write_bytes(b"partial")  # type: ignore[arg-type]
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 93632 vs 93520")

    monkeypatch.setattr(torch, "save", short_write)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(medgn.files.shutil, "disk_usage", lambda p: usage._replace(free=4096))
    with pytest.raises(ResourceError, match="no space left") as info:
        save_checkpoint(_state(2, 4.0), tmp_path)
    assert info.value.code == 5
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".medgn-tmp-")] == []
    monkeypatch.setattr(medgn.files.shutil, "disk_usage", lambda p: usage._replace(free=1 << 40))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # with space left it is not the disk
        save_checkpoint(_state(2, 4.0), tmp_path)
    monkeypatch.undo()
    assert json.loads((tmp_path / "latest.json").read_text())["iteration"] == 1


def test_rng_capture_restore_roundtrip_through_a_file(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leave a cached gaussian in numpy's state
    save_checkpoint({"model": {}, "rng": [capture_rng()], "counters": {"iteration": 1}}, tmp_path)
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng(load_checkpoint(tmp_path)["rng"][0])
    got = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
