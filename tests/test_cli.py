"""The CLI shell: version, env, exit codes per error category, one-line messages."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

import medgn
from medgn import cli
from medgn.errors import (
    EXIT_BROKEN_PIPE,
    InputDataError,
    LockedError,
    MedgnError,
    ModelError,
    ResourceError,
    UsageError,
)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "medgn", *args], capture_output=True, text=True, timeout=120)


def test_version() -> None:
    proc = _run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"medgn {medgn.__version__}"


def test_env_json_lists_versions() -> None:
    proc = _run("env", "--json")
    assert proc.returncode == 0
    import json

    info = json.loads(proc.stdout)
    assert info["versions"]["medgn"] == medgn.__version__
    assert info["versions"]["torch"]
    assert "cpu" in info["group_norm_backend"]


def test_unknown_subcommand_is_usage_error_on_one_line() -> None:
    proc = _run("frobnicate")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "frobnicate" in proc.stderr
    assert proc.stderr.startswith("medgn: error: argument COMMAND: invalid choice: 'frobnicate'"), proc.stderr


def test_argument_errors_of_a_subcommand_start_like_every_medgn_error(capsys: pytest.CaptureFixture[str]) -> None:
    proc = _run("infer", "--model", "m", "--input", "x")
    assert proc.returncode == 2
    assert proc.stderr == (
        "medgn: error: infer: the following arguments are required: --output (see 'medgn infer --help')\n"
    )
    # An unknown option is named with the command it was typed for, also in a nested command.
    for argv, command in (
        (["env", "--bogus"], "env"),
        (["study", "norms", "--data", "d", "--out", "o", "--bogus"], "study norms"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == (
            f"medgn: error: {command}: unrecognized arguments: --bogus (see 'medgn {command} --help')\n"
        )
    with pytest.raises(SystemExit):
        cli.main(["--bogus"])
    assert capsys.readouterr().err.startswith("medgn: error: unrecognized arguments: --bogus (see 'medgn --help')")


@pytest.mark.parametrize(
    "exc",
    [
        UsageError("k", "bad"),
        InputDataError("f.nii.gz", "bad"),
        ModelError("m.pt", "bad"),
        ResourceError("d", "full"),
        LockedError("o", "busy"),
    ],
)
def test_error_category_becomes_exit_code(
    exc: MedgnError, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fake_register(subparsers: argparse._SubParsersAction) -> None:
        p = subparsers.add_parser("boom")

        def run(args: argparse.Namespace) -> int:
            raise exc

        p.set_defaults(func=run)

    real_build = cli.build_parser

    def build_with_boom() -> argparse.ArgumentParser:
        parser = real_build()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        fake_register(sub)
        return parser

    monkeypatch.setattr(cli, "build_parser", build_with_boom)
    assert cli.main(["boom"]) == exc.code
    err = capsys.readouterr().err
    assert err == f"medgn: error: {exc.one_line()}\n"
    assert "Traceback" not in err


def test_bug_exits_1_with_log_pointer(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    real_build = cli.build_parser

    def build_with_bug() -> argparse.ArgumentParser:
        parser = real_build()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        p = sub.add_parser("bug")
        p.set_defaults(func=lambda args: 1 / 0)
        return parser

    monkeypatch.setattr(cli, "build_parser", build_with_bug)
    assert cli.main(["bug"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("medgn: internal error: ZeroDivisionError") and "traceback in" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_prints_the_traceback_before_or_after_the_subcommand(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "missing")
    argv = ["--debug", "verify", missing] if where == "before" else ["verify", missing, "--debug"]
    assert cli.main(argv) == cli.main(["verify", missing]) != 0
    with_debug, without = capsys.readouterr().err.split("medgn: error:", 1)
    assert "Traceback" in with_debug and "Traceback" not in without


@pytest.mark.parametrize(
    ("text", "minutes"),
    [
        ("20m", 20.0),
        ("20", 20.0),
        ("90s", 1.5),
        ("1.5h", 90.0),
        (".5h", 30.0),
        ("1h30m", 90.0),
        ("1h 30m", 90.0),
        (" 20 min ", 20.0),
        ("20M", 20.0),
    ],
)
def test_time_budget_accepts_units_and_compound_durations(text: str, minutes: float) -> None:
    from medgn.commands.train import parse_duration_minutes

    assert parse_duration_minutes(text) == pytest.approx(minutes)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("0m", "must be longer than zero"),
        ("-1m", "invalid duration"),
        ("20x", "invalid duration"),
        ("1h30", "invalid duration"),  # is the 30 minutes or seconds?
        ("1e3m", "invalid duration"),
        ("\u0661\u0662m", "invalid duration"),  # Arabic-Indic digits: float() would take them
        ("", "invalid duration"),
    ],
)
def test_time_budget_refuses_what_is_not_a_positive_duration(text: str, words: str) -> None:
    from medgn.commands.train import parse_duration_minutes

    with pytest.raises(UsageError, match=words):
        parse_duration_minutes(text)


EXIT_NOW_CHILD = """
import atexit, sys, threading, time
from pathlib import Path
from medgn.cli import exit_now
out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))
print("x" * 100_000)  # buffered: a pipe is not a terminal
if sys.argv[2] == "thread":
    threading.Thread(target=lambda: (time.sleep(0.3), (out / "thread").write_text("done"))).start()
exit_now(3)
"""


@pytest.mark.parametrize("thread", ["none", "thread"])
def test_exit_now_keeps_what_a_clean_exit_does(thread: str, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", EXIT_NOW_CHILD, str(tmp_path), thread], capture_output=True, text=True)
    assert r.returncode == 3 and r.stdout == "x" * 100_000 + "\n" and r.stderr == ""
    assert (tmp_path / "atexit").read_text() == "ran"
    if thread == "thread":  # a running non-daemon thread is waited for, as Python's own exit does
        assert (tmp_path / "thread").read_text() == "done"


def test_the_console_command_exits_with_mains_code(tmp_path: Path) -> None:
    r = _run("verify", str(tmp_path / "missing"))  # through exit_now, as the env and --version tests
    assert r.returncode == 2 and r.stderr.startswith("medgn: error:") and r.stderr.count("\n") == 1


def test_a_reader_that_left_is_not_an_internal_error() -> None:
    """``medgn env | head -0``: writing to a pipe whose reader has gone was an internal error (exit 1)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "medgn", "env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader leaves before medgn writes its first line
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == EXIT_BROKEN_PIPE == 141
    assert "internal error" not in err and "Traceback" not in err, err
