"""The run folder's own bookkeeping: which fold it trains on, and removing one refused at start.

This module owns ``run.json`` (the fold a run trains on, so that ``--resume`` repeats it: another
fold would validate on cases the run trained on; the checkpoints store the fold too, and the two
must agree) and the removal of a run folder that a new run
created and then refused before training (a fold out of range, another dataset's splits), which
takes its lock last so that no other run enters a folder half removed.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from medgn.errors import UsageError
from medgn.files import RunLock, atomic_write_json, is_inside
from medgn.logs import get_logger
from medgn.planning.splits import ALL_FOLDS, SPLITS_FILE

log = get_logger(__name__)

RUN_RECORD = "run.json"  # what a resume must repeat: the fold
DATASET_PLAN = "dataset_plan.json"  # the plan the run started from (made from the data, or its --plan)
RUN_PLAN = "plan.json"  # the plan this run trains with (after the config's overrides)
RESOLVED_CONFIG = "config.yaml"  # the run config with every default and override resolved
RUN_LOG = "medgn.log"


def write_run_record(out_dir: Path, fold: int, **extra: Any) -> None:
    """Record the fold of a run (``"all"`` or its number), with ``extra`` fields (settings a resume changed)."""
    record = {"fold": "all" if fold == ALL_FOLDS else fold, **extra}
    atomic_write_json(out_dir / RUN_RECORD, record, overwrite=True)


def fold_name(fold: int) -> str:
    """A fold as the user writes it: ``all`` or its number."""
    return "all" if fold == ALL_FOLDS else str(fold)


def parse_fold_value(value: Any) -> int | None:
    """A fold as run.json and checkpoints store it (``"all"`` or a number >= 0), or None when invalid."""
    if value == "all":
        return ALL_FOLDS
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def read_run_record(out_dir: Path) -> dict[str, Any] | None:
    """The run record of a run folder, or None when it has none.

    Raises:
        UsageError: run.json exists but is not a record with a valid fold (exit 2), named.
    """
    path = out_dir / RUN_RECORD
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(path, f"unreadable run record ({exc})", expected=f"{_RECORD_FORM}; {_RECORD_FIX}") from None
    if not isinstance(record, dict) or parse_fold_value(record.get("fold")) is None:
        shown = record.get("fold") if isinstance(record, dict) else record
        raise UsageError(
            path, "malformed run record", got=f"fold {shown!r}"[:100], expected=f"{_RECORD_FORM}; {_RECORD_FIX}"
        )
    return record


_RECORD_FORM = 'a JSON object {"fold": N or "all"} as medgn train wrote it'
_RECORD_FIX = "restore it, or remove it to take the fold from the run's checkpoint"


def recorded_fold(out_dir: Path) -> int | None:
    """The fold a run folder says it trains on: its run record; without one (runs from before the
    record), ``all`` when it holds no splits (a fold run always has them), else unknown (None).

    Raises:
        UsageError: a malformed run.json (see :func:`read_run_record`).
    """
    record = read_run_record(out_dir)
    if record is not None:
        return parse_fold_value(record["fold"])
    return ALL_FOLDS if not (out_dir / SPLITS_FILE).exists() else None


def check_resumed_fold(out_dir: Path, fold: int, checkpoint_fold: Any = None) -> None:
    """A resume continues the run's own fold: another would validate on cases it trained on.

    The fold comes from the checkpoint (``checkpoint_fold``, as stored) and from the run folder
    (run.json, or for older runs the presence of splits.json); both must agree. A checkpoint from
    before the fold was stored in it (``checkpoint_fold`` None) is checked against the folder alone.

    Raises:
        UsageError: another fold, a malformed run.json, or a folder that contradicts its checkpoint.
    """
    folder = recorded_fold(out_dir)
    stored = parse_fold_value(checkpoint_fold)
    if stored is not None and folder is not None and folder != stored:
        if (out_dir / RUN_RECORD).exists():
            what = f"the run's record says fold {fold_name(folder)}, its checkpoint fold {fold_name(stored)}"
        else:
            what = (
                f"without run.json and splits.json the run in {out_dir} trains on fold all, but its checkpoint "
                f"was trained on fold {fold_name(stored)}"
            )
        raise UsageError(
            out_dir / RUN_RECORD, what, expected="run.json and splits.json as the run wrote them, or a new --out"
        )
    if stored is None:
        log.warning("the checkpoint records no fold (an older medgn): the fold is checked against run.json only")
    recorded = stored if stored is not None else folder
    if recorded is not None and recorded != fold:
        raise UsageError(
            "--fold",
            f"the run in {out_dir} trains on fold {fold_name(recorded)}",
            got=fold_name(fold),
            expected=f"--fold {fold_name(recorded)} to resume it, or a new --out",
        )


def remove_new_run(out_dir: Path, lock: RunLock | None) -> None:
    """Remove a run folder this call created and refused before training, its log included.

    Everything but the lock goes first, then the lock, then the folder: another run never takes
    the lock of a folder half removed.
    """
    import shutil

    from medgn.logs import current_log_path, detach_file_logs

    log_path = current_log_path()
    if log_path is not None and is_inside(log_path, out_dir):
        detach_file_logs()
    for path in out_dir.iterdir():
        if lock is not None and path == lock.path:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if lock is not None:
        lock.release()
    with contextlib.suppress(OSError):
        out_dir.rmdir()


# What a new run writes into its folder before training: removed again when it is refused there.
SETUP_FILES = (RUN_RECORD, DATASET_PLAN, RUN_PLAN, RESOLVED_CONFIG, SPLITS_FILE, RUN_LOG)


def remove_new_files(out_dir: Path, before: set[str]) -> None:
    """Remove what a new run refused before training wrote into a folder that existed before it
    (:data:`SETUP_FILES` that were not there), keeping everything else: files another program
    writes there meanwhile included."""
    from medgn.logs import current_log_path, detach_file_logs

    log_path = current_log_path()
    if log_path is not None and is_inside(log_path, out_dir) and log_path.name not in before:
        detach_file_logs()
    for name in SETUP_FILES:
        if name not in before:
            (out_dir / name).unlink(missing_ok=True)
