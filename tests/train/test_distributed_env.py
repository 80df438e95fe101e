"""torchrun's environment is checked before a process group is joined; a lost peer is not a bug.

A leaked or hand-written environment (``WORLD_SIZE=2`` left in a shell, ``RANK=5`` of 2) used to fail
inside PyTorch (exit 1) or wait 30 minutes for ranks that never come; it is now exit 2 naming the
variables, before ``init_process_group``. A rank killed mid-run leaves the others with a gloo/NCCL
error at their next collective: exit 5, "another rank stopped", not an internal error.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from medgn.cli import main
from medgn.errors import ResourceError, UsageError
from medgn.train import distributed as ddp

VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "MEDGN_JOIN_TIMEOUT",
    "TORCHELASTIC_USE_AGENT_STORE",
)
GLOO_RESET = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:50835: "
    "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the application."
)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch):
    """A clean rank environment; the test sets what it needs. Joining a group fails the test."""
    for name in VARS:
        monkeypatch.delenv(name, raising=False)

    def never(*args, **kwargs):
        raise AssertionError("init_process_group reached: it would wait for the other ranks")

    monkeypatch.setattr(dist, "init_process_group", never)

    def set_env(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_env


RENDEZVOUS = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}


@pytest.mark.parametrize(
    ("values", "where", "words"),
    [
        ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR, MASTER_PORT", "MASTER_ADDR and MASTER_PORT unset"),
        ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "h"}, "MASTER_PORT", "MASTER_PORT unset"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE", "must be positive (got 0"),
        ({"WORLD_SIZE": "-1", "RANK": "0"}, "WORLD_SIZE", "must be positive (got -1"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE", "not an integer"),
        ({"RANK": "5", "WORLD_SIZE": "2", **RENDEZVOUS}, "RANK", "RANK=5 WORLD_SIZE=2"),
        ({"RANK": "-1", "WORLD_SIZE": "2", **RENDEZVOUS}, "RANK", "RANK=-1 WORLD_SIZE=2"),
        ({"RANK": "3"}, "RANK", "WORLD_SIZE unset"),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "2", **RENDEZVOUS}, "LOCAL_RANK", "LOCAL_RANK=2"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "1", **RENDEZVOUS}, "LOCAL_RANK", "LOCAL_RANK <= RANK"),
        (
            {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2", **RENDEZVOUS},
            "LOCAL_RANK",
            "LOCAL_WORLD_SIZE=2",
        ),
        ({"LOCAL_RANK": "-1"}, "LOCAL_RANK", "LOCAL_RANK=-1"),
    ],
)
def test_bad_rank_environment_is_refused_before_joining(env, values: dict, where: str, words: str) -> None:
    env(**values)
    with pytest.raises(UsageError) as info:
        ddp.init_distributed("cpu")
    assert info.value.where == where and words in info.value.one_line(), info.value.one_line()
    assert info.value.code == 2


@pytest.mark.parametrize(
    ("values", "layout"),
    [
        ({}, (0, 1, 0)),
        ({"RANK": "0", "WORLD_SIZE": "1"}, (0, 1, 0)),
        ({"LOCAL_RANK": "1"}, (0, 1, 1)),  # one process choosing its GPU: plain cuda is cuda:LOCAL_RANK
        ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", **RENDEZVOUS}, (3, 4, 1)),
    ],
)
def test_good_rank_environment(env, values: dict, layout: tuple[int, int, int]) -> None:
    env(**values)
    info = ddp.dist_info_from_env()
    assert (info.rank, info.world_size, info.local_rank) == layout


def test_train_command_refuses_a_leaked_world_size_with_exit_2(env, tmp_path, capsys) -> None:
    env(WORLD_SIZE="2", RANK="0")
    out = tmp_path / "run"
    code = main(["train", "--data", str(tmp_path), "--out", str(out), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "MASTER_ADDR, MASTER_PORT" in err[0] and "WORLD_SIZE=2" in err[0], err
    assert not out.exists()


def test_peer_failure_is_found_in_the_chain() -> None:
    gloo = RuntimeError(GLOO_RESET)
    assert ddp.peer_failure(gloo) is gloo
    try:
        try:
            raise gloo
        except RuntimeError as inner:
            raise ValueError("while saving") from inner
    except ValueError as outer:
        assert ddp.peer_failure(outer) is gloo
    backend = dist.DistBackendError("NCCL watchdog: communicator aborted")
    assert ddp.peer_failure(backend) is backend
    assert ddp.peer_failure(RuntimeError("shape mismatch")) is None
    assert ddp.peer_failure(None) is None


def _raising(exc: BaseException):
    def run(args):
        raise exc

    return run


@pytest.mark.parametrize(
    ("world_size", "exc", "code", "words"),
    [
        ("2", RuntimeError(GLOO_RESET), 5, "medgn: error: another rank stopped (got RuntimeError: [/"),
        (
            "2",
            dist.DistNetworkError("Connection closed by peer"),
            5,
            "medgn: error: another rank stopped (got DistNetworkError",
        ),
        ("2", RuntimeError("index out of range"), 1, "medgn: internal error: RuntimeError: index out of range"),
        ("1", RuntimeError(GLOO_RESET), 1, "medgn: internal error: RuntimeError: [/"),  # no torchrun: a bug
    ],
)
def test_cli_reports_a_lost_rank_on_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys, world_size: str, exc: BaseException, code: int, words: str
) -> None:
    import medgn.commands.env as env_command

    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setattr(env_command, "run", _raising(exc))
    assert main(["env"]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(words), err


def test_a_busy_master_port_is_exit_2_naming_the_port(monkeypatch, tmp_path, capsys) -> None:
    # Rank 0 starts the rendezvous server on MASTER_PORT; a port in use failed there and read as
    # "another rank stopped" (exit 5), sending the user to look for a rank that never ran.
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for name in VARS:
            monkeypatch.delenv(name, raising=False)
        for name, value in {
            "RANK": "0",
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }.items():
            monkeypatch.setenv(name, value)
        out = tmp_path / "run"
        code = main(["train", "--data", str(tmp_path), "--out", str(out), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"127.0.0.1:{port}: the port is in use" in err[0] and err[0].startswith("medgn: error: MASTER_PORT:"), err
    assert not dist.is_initialized()


def test_a_process_group_that_cannot_be_joined_is_a_resource_error(env, monkeypatch) -> None:
    # Under torchrun the agent hosts the store and PyTorch's own join runs.
    env(RANK="1", WORLD_SIZE="2", TORCHELASTIC_USE_AGENT_STORE="True", **RENDEZVOUS)

    def timed_out(*args, **kwargs):
        raise dist.DistNetworkError("The client socket has timed out after 1800000ms while trying to connect")

    monkeypatch.setattr(dist, "init_process_group", timed_out)
    with pytest.raises(ResourceError) as info:
        ddp.init_distributed("cpu")
    line = info.value.one_line()
    assert info.value.code == 5 and "cannot join the process group at 127.0.0.1:29555" in line
    assert "timed out" in line


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    ("rank", "words"),
    [
        ("0", "(got Timed out after"),  # rank 0 waits for its clients: "1/2 clients joined"
        ("1", ": rank 0 did not answer in 1 s (got"),
    ],
)
def test_a_hand_launched_rank_alone_stops_after_the_join_timeout(env, tmp_path, capsys, rank, words) -> None:
    # WORLD_SIZE=2 with one process started (by hand or a scheduler, no torchrun agent) waited PyTorch's
    # 30 minutes; it now waits MEDGN_JOIN_TIMEOUT seconds (default 300) and says what to start.
    import time

    env(RANK=rank, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), MEDGN_JOIN_TIMEOUT="1")
    out = tmp_path / "run"
    began = time.monotonic()
    code = main(["train", "--data", str(tmp_path), "--out", str(out), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 5 and len(err) == 1, err
    assert err[0].startswith("medgn: error: cannot join the process group at 127.0.0.1:") and words in err[0], err
    assert "MEDGN_JOIN_TIMEOUT" in err[0], err
    assert time.monotonic() - began < 60 and not out.exists() and not dist.is_initialized()


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"MEDGN_JOIN_TIMEOUT": "soon"}, "MEDGN_JOIN_TIMEOUT: environment variable is not a number of seconds"),
        ({"MEDGN_JOIN_TIMEOUT": "0"}, "MEDGN_JOIN_TIMEOUT: environment variable is not a number of seconds"),
        ({"MASTER_PORT": "99999"}, "MASTER_PORT: not a TCP port (got 99999"),
        ({"MASTER_PORT": "http"}, "MASTER_PORT: not a TCP port (got http"),
    ],
)
def test_join_settings_that_cannot_work_are_exit_2(env, values, where) -> None:
    env(RANK="0", WORLD_SIZE="2", **{**RENDEZVOUS, **values})
    with pytest.raises(UsageError) as info:
        ddp.init_distributed("cpu")
    assert info.value.code == 2 and where in info.value.one_line()


def test_hand_launched_ranks_join_whichever_starts_first(tmp_path) -> None:
    # Two processes with RANK/WORLD_SIZE/MASTER_* set by hand (as a scheduler's job script does), rank 1
    # started first: it waits for rank 0 quietly (PyTorch's client printed a C++ stack trace on every
    # retry), then both join and reduce.
    import os
    import subprocess
    import sys
    import time

    code = (
        "import torch, torch.distributed as d; from medgn.train.distributed import init_distributed; "
        "init_distributed('cpu'); t = torch.tensor([d.get_rank() + 1]); d.all_reduce(t); print(int(t))"
    )
    base = {k: v for k, v in os.environ.items() if k not in VARS}
    port = str(_free_port())
    procs = []
    for rank in ("1", "0"):
        env = {**base, "RANK": rank, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(
            subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )
        time.sleep(2)
    try:
        results = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, (stdout, stderr) in zip(procs, results):
        assert proc.returncode == 0 and stdout.decode().strip() == "3", (stdout, stderr)
        assert b"socket.cpp" not in stderr and b"frame #" not in stderr, stderr[-2000:]
