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

VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
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
    env(RANK="1", WORLD_SIZE="2", **RENDEZVOUS)

    def timed_out(*args, **kwargs):
        raise dist.DistNetworkError("The client socket has timed out after 1800000ms while trying to connect")

    monkeypatch.setattr(dist, "init_process_group", timed_out)
    with pytest.raises(ResourceError) as info:
        ddp.init_distributed("cpu")
    line = info.value.one_line()
    assert info.value.code == 5 and "cannot join the process group at 127.0.0.1:29555" in line
    assert "timed out" in line
