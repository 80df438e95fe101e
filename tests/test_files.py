"""Atomic writes and the output-folder lock."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from medgn import files
from medgn.errors import LockedError, ResourceError, UsageError


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(files.TEMP_MARK)]


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    files.atomic_write_json(target, {"a": 1})
    files.atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert _temps(tmp_path) == []


def test_temp_keeps_compound_suffix(tmp_path: Path) -> None:
    seen = []
    with files.atomic_path(tmp_path / "case.nii.gz") as tmp:
        seen.append(tmp.name)
        tmp.write_bytes(b"x")
    assert seen[0].endswith(".nii.gz") and seen[0].startswith(files.TEMP_MARK)


def test_enospc_mid_write_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "mask.bin"
    target.write_bytes(b"old content")

    def failing_writer(path: Path) -> None:
        with open(path, "wb") as handle:
            handle.write(b"half")
            handle.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ResourceError) as info:
        files.atomic_write_with(target, failing_writer)
    assert info.value.code == 5
    assert str(target) in info.value.one_line()
    assert target.read_bytes() == b"old content"
    assert _temps(tmp_path) == []


def test_enospc_in_fsync_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(ResourceError):
        files.atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert _temps(tmp_path) == []


def test_other_errors_propagate_and_clean_up(tmp_path: Path) -> None:
    target = tmp_path / "x.txt"

    def boom(path: Path) -> None:
        path.write_text("partial")
        raise RuntimeError("writer bug")

    with pytest.raises(RuntimeError):
        files.atomic_write_with(target, boom)
    assert not target.exists()
    assert _temps(tmp_path) == []


def test_no_overwrite_refuses(tmp_path: Path) -> None:
    target = tmp_path / "x.txt"
    target.write_text("keep")
    with pytest.raises(UsageError):
        files.atomic_write_text(target, "new", overwrite=False)
    assert target.read_text() == "keep"


def test_written_file_has_normal_permissions(tmp_path: Path) -> None:
    target = files.atomic_write_text(tmp_path / "p.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask


def test_nan_is_refused_in_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        files.atomic_write_json(tmp_path / "n.json", {"x": float("nan")})
    assert not (tmp_path / "n.json").exists()


def test_lock_second_process_gets_code_6(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from medgn.files import RunLock\n"
        "from medgn.errors import LockedError\n"
        f"try:\n    RunLock({str(tmp_path)!r}).acquire()\n"
        "except LockedError as e:\n    print(e.one_line()); sys.exit(e.code)\n"
    )
    with files.RunLock(tmp_path):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 6
    assert "in use by another medgn run" in proc.stdout
    assert not (tmp_path / files.LOCK_NAME).exists()


def test_stale_lock_from_dead_process_is_taken_over(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (tmp_path / files.LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    lock = files.RunLock(tmp_path).acquire()
    assert lock.stale_removed is not None and lock.stale_removed["pid"] == dead.pid
    assert json.loads((tmp_path / files.LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_live_lock_in_same_process_is_refused(tmp_path: Path) -> None:
    with files.RunLock(tmp_path), pytest.raises(LockedError):
        files.RunLock(tmp_path).acquire()


def test_clean_stale_temps(tmp_path: Path) -> None:
    (tmp_path / f"{files.TEMP_MARK}abc-x.nii.gz").write_bytes(b"x")
    (tmp_path / "keep.nii.gz").write_bytes(b"x")
    removed = files.clean_stale_temps(tmp_path)
    assert [p.name for p in removed] == [f"{files.TEMP_MARK}abc-x.nii.gz"]
    assert (tmp_path / "keep.nii.gz").exists()


def test_is_inside_resolves_dots_and_links(tmp_path: Path) -> None:
    from medgn.files import is_inside

    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(data / "sub")
    assert is_inside(data, data) and is_inside(data / "sub" / "out", data)
    assert is_inside(tmp_path / "link" / "out", data)  # a link into the input tree is inside it
    assert is_inside(tmp_path / "other" / ".." / "data" / "x", data)
    assert not is_inside(tmp_path / "data2", data) and not is_inside(tmp_path, data)


def test_hashes_are_the_one_implementation(tmp_path: Path) -> None:
    import hashlib

    from medgn.files import file_sha256, json_sha256, path_sha256

    (tmp_path / "a.bin").write_bytes(b"abc")
    assert file_sha256(tmp_path / "a.bin") == path_sha256(tmp_path / "a.bin") == hashlib.sha256(b"abc").hexdigest()
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "2.dcm").write_bytes(b"y")
    (folder / "1.dcm").write_bytes(b"x")
    assert path_sha256(folder) == hashlib.sha256(b"1.dcm\0x2.dcm\0y").hexdigest()  # names and bytes, sorted
    assert json_sha256({"b": 1, "a": [1, 2]}) == hashlib.sha256(b'{"a":[1,2],"b":1}').hexdigest()
    assert json_sha256({"b": 1}, compact=False) == hashlib.sha256(b'{"b": 1}').hexdigest()


@pytest.mark.parametrize("kind", ["fifo", "folder", "dangling_link"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_path_that_is_no_regular_file_is_never_replaced(tmp_path: Path, kind: str, overwrite: bool) -> None:
    target = tmp_path / "mask.nii.gz"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "folder":
        target.mkdir()
    else:
        target.symlink_to(tmp_path / "gone")
    with pytest.raises(UsageError, match="only a regular file is replaced"):
        files.atomic_write_bytes(target, b"data", overwrite=overwrite)
    assert os.path.lexists(target) and not target.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["mask.nii.gz"]  # no temporary file left


def test_a_destination_that_turns_into_a_fifo_while_writing_is_not_replaced(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    with pytest.raises(UsageError, match="only a regular file is replaced"):
        with files.atomic_path(target) as tmp:
            tmp.write_bytes(b"{}")
            os.mkfifo(target)
    assert not target.is_file() and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_an_output_folder_on_a_full_disk_is_a_resource_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = Path.write_bytes

    def full(self: Path, data: bytes) -> int:
        if self.name.startswith(files.TEMP_MARK):  # the probe
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(ResourceError, match="no space left on device in the output folder"):
        files.make_output_dir(tmp_path / "out")
    with pytest.raises(UsageError, match="is not writable"):  # any other failure stays a usage error
        files.make_output_dir(Path("/proc/medgn_out"))


_LOCK_WORKER = """
import os, sys
from medgn.errors import LockedError
from medgn.files import RunLock
folder, rounds = sys.argv[1], int(sys.argv[2])
held = clashes = 0
for _ in range(rounds):
    child = os.fork()
    if child == 0:  # a run that takes the lock and dies without releasing it: a file is left
        try:
            RunLock(folder).acquire()
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    lock = RunLock(folder)
    try:
        lock.acquire()
    except LockedError:
        continue
    held += 1
    try:  # only the holder of the lock may hold this file: a second holder finds it
        os.close(os.open(os.path.join(folder, "inside"), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        clashes += 1
    else:
        os.unlink(os.path.join(folder, "inside"))
    lock.release()
print(held, clashes)
"""


def test_two_processes_never_hold_the_lock_at_once(tmp_path: Path) -> None:
    """Taking over a lock a killed run left, then racing on it: one holder at a time, no other error.

    Reading a dead holder's pid, unlinking its file and creating a new one let two runs in at once
    (the second unlinked the first's fresh lock), and a holder releasing between a failed create
    and the stat of its file was an internal error.
    """
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import time; from medgn.files import RunLock; RunLock({str(tmp_path)!r}).acquire(); "
            "print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with pytest.raises(LockedError, match=f"pid {holder.pid} on"):
        files.RunLock(tmp_path).acquire()
    holder.kill()  # SIGKILL: no release; its file stays behind
    holder.wait()
    assert (tmp_path / files.LOCK_NAME).exists()
    lock = files.RunLock(tmp_path).acquire()
    assert lock.stale_removed is not None and lock.stale_removed["pid"] == holder.pid
    lock.release()
    racers = [
        subprocess.Popen([sys.executable, "-c", _LOCK_WORKER, str(tmp_path), "300"], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [r.communicate(timeout=120)[0].split() for r in racers]
    assert [r.returncode for r in racers] == [0, 0]
    assert all(clashes == "0" for _, clashes in results), results
    assert sum(int(held) for held, _ in results) > 0


def test_files_with_names_near_the_limit_are_written(tmp_path: Path) -> None:
    """The temporary name adds 24 bytes to the final one: a legal 250-byte name could not be written."""
    name = "é" * 120 + "x.nii.gz"  # 248 bytes in UTF-8
    assert len(name.encode()) == 248
    out = files.atomic_write_text(tmp_path / name, "data")
    assert out.read_text() == "data" and [p.name for p in tmp_path.iterdir()] == [name]
    fitted = files.fit_name(name, files.TEMP_ROOM)
    assert len(fitted.encode()) <= files.TEMP_ROOM and fitted.endswith(".nii.gz")
    assert files.fit_name("a" * 300 + ".png") != files.fit_name("a" * 299 + "b.png")  # the digest keeps them apart
    assert files.fit_name("short.png") == "short.png"


def test_a_forked_child_does_not_keep_a_killed_runs_lock(tmp_path: Path) -> None:
    """A DataLoader worker outliving its killed run kept the flock (the same open file) for seconds."""
    script = (
        "import os, sys, time\n"
        "from medgn.files import RunLock\n"
        f"RunLock({str(tmp_path)!r}).acquire()\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    null = os.open(os.devnull, os.O_RDWR)\n"
        "    os.dup2(null, 1)\n"
        "    os.dup2(null, 2)\n"
        "    time.sleep(30)\n"
        "    os._exit(0)\n"
        "print(child, flush=True)\n"
        "os._exit(0)  # killed: no release\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    worker = int(proc.stdout.strip())
    try:
        lock = files.RunLock(tmp_path).acquire()  # while the worker still runs
        lock.release()
    finally:
        os.kill(worker, signal.SIGKILL)
