"""The ``medgn`` command line: argument parsing and dispatch to subcommands.

Each subcommand lives in ``medgn/commands/<name>.py`` with ``register(subparsers)`` adding its
parser (and ``set_defaults(func=...)``); the function calls the Python API. This module maps
errors to exit codes: 0 success, 2 usage/config, 3 invalid input data, 4 invalid model or
checkpoint, 5 resources (also a torchrun job that lost another rank), 6 output locked, 130/143
stopped by SIGINT/SIGTERM, 1 a bug. Users see one line; tracebacks go to the log.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import logging
import os
import select
import sys
import threading
import traceback
import warnings
from collections.abc import Sequence

import medgn
from medgn.errors import (
    EXIT_BROKEN_PIPE,
    EXIT_BUG,
    EXIT_OK,
    EXIT_USAGE,
    MedgnError,
    ResourceError,
    brief,
    out_of_memory,
)
from medgn.logs import attach_file_log, current_log_path, fallback_log_path, get_logger

# Subcommands in the order `medgn --help` lists them; each names a module in medgn/commands.
SUBCOMMANDS: tuple[str, ...] = ("env", "verify", "plan", "train", "infer", "evaluate", "export", "study")
# What asks for less memory, by subcommand, in the one line of an out-of-memory error (exit 5).
_LESS_MEMORY = {
    "train": ", or a smaller plan.patch_size or train.batch_size (--set)",
    "study": ", or smaller --batch-sizes or plan.patch_size (--set)",
    "infer": ", or a smaller --sw-batch-size",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit code 2.

    The line starts ``medgn: error:`` like every other medgn error, then names the subcommand:
    ``medgn: error: infer: the following arguments are required: --output (see 'medgn infer --help')``.
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.removeprefix("medgn").strip()
        where = f"{command}: " if command else ""
        sys.stderr.write(f"medgn: error: {where}{message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    """The full ``medgn`` argument parser with every registered subcommand."""
    parser = OneLineParser(prog="medgn", description="3D medical-image segmentation with a fused GroupNorm U-Net.")
    parser.add_argument("--version", action="version", version=f"medgn {medgn.__version__}")
    parser.add_argument("--debug", action="store_true", help="print tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"medgn.commands.{name}")
        module.register(subparsers)
    _remember_parsers(parser)
    return parser


def _remember_parsers(parser: argparse.ArgumentParser) -> None:
    """Give every (sub)command's parser a default ``_parser`` naming itself, the deepest one winning.

    An option no parser knows is only noticed after the subcommand has parsed; :func:`main` then
    reports it through the parser of the command it was typed for.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.set_defaults(_parser=sub)
                # `medgn infer ... --debug` as well as `medgn --debug infer ...`
                sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
                _remember_parsers(sub)


def _report(exc: BaseException, debug: bool) -> None:
    log = get_logger("cli")
    if current_log_path() is None:
        try:
            attach_file_log(fallback_log_path())
        except OSError:
            pass
    log.error("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)


def _to_medgn_log(record: logging.LogRecord) -> None:
    """Hand a library's record to medgn's own handlers (its log files), not up the hierarchy again."""
    for handler in logging.getLogger("medgn").handlers:
        if record.levelno >= handler.level:
            handler.handle(record)


class _IntoMedgnLog(logging.Filter):
    """A logger filter that hands every record to medgn's log files and stops it there.

    As a filter on the logger (not a handler), it also stops handlers that a library adds to its
    own logger when it is imported later (nibabel gives ``nibabel.global`` a stderr handler).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        _to_medgn_log(record)
        return False


class _LibrariesIntoMedgnLog(logging.Handler):
    """The root logger's handler: other libraries' warnings (highdicom, pydicom...) go to medgn's log.

    With a handler at the root, logging's last-resort handler no longer prints them on stderr.
    """

    def emit(self, record: logging.LogRecord) -> None:
        if record.name != "medgn" and not record.name.startswith("medgn."):  # those have their handlers
            _to_medgn_log(record)


def _quiet_third_party() -> None:
    """Keep the terminal to medgn's own lines: library notices and Python warnings go to the log.

    medgn's own records go to log files only: a NullHandler keeps logging's last-resort handler
    from printing warnings and errors next to the one ``medgn: error:`` line. nibabel's header
    notices ("vox offset not divisible by 16") and Python warnings ("Extension size ...") would
    print beside it; they are recorded in the run's log file instead.
    """
    medgn_logger = logging.getLogger("medgn")
    if not any(isinstance(h, logging.NullHandler) for h in medgn_logger.handlers):
        medgn_logger.addHandler(logging.NullHandler())
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
    logging.captureWarnings(True)  # as "py.warnings" records, which the root handler below takes
    nibabel = logging.getLogger("nibabel.global")  # the one library logger with its own stderr handler
    if not any(isinstance(f, _IntoMedgnLog) for f in nibabel.filters):
        nibabel.addFilter(_IntoMedgnLog())
    root = logging.getLogger()
    if not any(isinstance(h, _LibrariesIntoMedgnLog) for h in root.handlers):
        root.addHandler(_LibrariesIntoMedgnLog(logging.WARNING))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:  # "medgn: error: train: unrecognized arguments: --out-dir (see 'medgn train --help')"
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extras)}")
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    logging.getLogger("medgn").setLevel(logging.INFO)
    _quiet_third_party()
    try:
        result = args.func(args)
        return EXIT_OK if result is None else int(result)
    except MedgnError as exc:
        _report(exc, args.debug)
        kind = "stopped" if exc.code > 128 else "error"  # 130/143: a signal stopped it, after saving what it had
        sys.stderr.write(f"medgn: {kind}: {exc.one_line()}\n")
        return exc.code
    except KeyboardInterrupt:
        sys.stderr.write("medgn: interrupted\n")
        return 130
    except Exception as exc:  # noqa: BLE001 - any other exception is a bug: exit 1, unless memory ran out
        if isinstance(exc, BrokenPipeError) and _stdout_closed():
            return EXIT_BROKEN_PIPE  # medgn ... | head: the reader left; the files written are complete
        _report(exc, args.debug)
        where = current_log_path() or fallback_log_path()
        oom = out_of_memory(exc)
        if oom is not None:  # a resource, not a bug: exit 5 on one line
            err = ResourceError(
                "",
                "out of memory",
                got=f"{type(oom).__name__}: {brief(oom, 160)}" if str(oom) else type(oom).__name__,
                expected=f"more free memory{_LESS_MEMORY.get(args.command, '')}; traceback in {where}",
            )
            sys.stderr.write(f"medgn: error: {err.one_line()}\n")
            return err.code
        peer = _peer_failure(exc)
        if peer is not None:  # under torchrun: another rank died first; its own message says why
            err = ResourceError(
                "",
                "another rank stopped",
                got=f"{type(peer).__name__}: {brief(peer, 160)}",
                expected=f"the first failing rank's error (torchrun names it); traceback in {where}",
            )
            sys.stderr.write(f"medgn: error: {err.one_line()}\n")
            return err.code
        first = str(exc).splitlines()[0] if str(exc) else ""
        sys.stderr.write(f"medgn: internal error: {type(exc).__name__}: {first} (traceback in {where})\n")
        return EXIT_BUG


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (``medgn verify | head -1``: the pipe reports an
    error); stdout then leads to /dev/null, so that nothing fails again at exit."""
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        closed = any(events & select.POLLERR for _, events in poller.poll(0))
        if closed:
            os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
        return closed
    except (OSError, ValueError, AttributeError):  # no descriptor (a captured stream), or no poll()
        return False


def _peer_failure(exc: BaseException) -> BaseException | None:
    """Under torchrun (WORLD_SIZE > 1), the error in ``exc``'s chain saying another rank is gone."""
    if "torch.distributed" not in sys.modules:  # no process group was ever joined
        return None
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
    except ValueError:
        return None
    from medgn.train.distributed import peer_failure

    return peer_failure(exc)


def console_main() -> None:
    """Entry point of the ``medgn`` console script."""
    exit_now(main())  # argparse's SystemExit (--help, --version, bad arguments) passes through


def exit_now(code: int) -> None:
    """End the process with ``code`` without tearing the interpreter down.

    With torch loaded, Python's own shutdown (freeing every module, then torch's C++ destructors) takes
    0.3-0.4 s, an eighth of a one-scan ``medgn infer``. Everything a clean exit does that matters runs
    first: the ``atexit`` functions (logging's flush and close, the finalizers of temporary folders,
    TensorBoard's writer) and the flush of stdout and stderr. While a non-daemon thread still runs,
    Python's ordinary exit waits for it as usual.
    """
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        raise SystemExit(code)
    try:
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed pipe (medgn ... | head): nothing left to say
                stream.flush()
    finally:
        os._exit(code)


if __name__ == "__main__":
    console_main()
