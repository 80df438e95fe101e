#!/opt/medgn/venv/bin/python
"""The container's ``medgn``: the package's console script with SIGTERM turned into a clean stop.

In a container ``medgn`` runs as PID 1, and the kernel ignores signals for PID 1 that have no
handler: ``docker stop`` would wait its grace period and then SIGKILL, possibly in the middle of a
file write. This wrapper installs a SIGTERM handler that raises KeyboardInterrupt, so medgn stops the
way it stops on Ctrl-C (temporary files removed, finished outputs kept; training installs its own
handler and checkpoints first), and exits with 143 (128 + SIGTERM) as a terminated process would.
It finds the module of the ``medgn`` console-script entry point by name, so it follows the package's
layout, and runs its ``main``; it ends the process with that module's ``exit_now`` as the console
script does (no interpreter shutdown, which takes 0.3-0.4 s with torch loaded).
"""

from __future__ import annotations

import importlib
import signal
import sys
from importlib.metadata import entry_points
from types import FrameType, ModuleType

_terminated = False


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    global _terminated
    _terminated = True
    raise KeyboardInterrupt


def _cli() -> ModuleType:
    """The module of the ``medgn`` console-script entry point."""
    (entry,) = entry_points(group="console_scripts", name="medgn")
    return importlib.import_module(entry.module)


def main(cli: ModuleType) -> int:
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        result = cli.main()
        code = 0 if result is None else int(result)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        code = 130
    # 130 is medgn's answer to an interrupt; a SIGTERM is reported as 128 + 15.
    return 143 if _terminated and code == 130 else code


if __name__ == "__main__":
    cli = _cli()
    status = main(cli)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # done: a late SIGTERM must not raise during the exit
    getattr(cli, "exit_now", sys.exit)(status)
