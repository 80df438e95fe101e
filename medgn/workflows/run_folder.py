"""The run folder's own bookkeeping: which fold it trains on, and removing one refused at start.

This module owns ``run.json`` (the fold a run trains on, so that ``--resume`` repeats it: another
fold would validate on cases the run trained on) and the removal of a run folder that a new run
created and then refused before training (a fold out of range, another dataset's splits), which
takes its lock last so that no other run enters a folder half removed.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from medgn.errors import UsageError
from medgn.files import RunLock, atomic_write_json, is_inside
from medgn.planning.splits import ALL_FOLDS, SPLITS_FILE

RUN_RECORD = "run.json"  # what a resume must repeat: the fold
DATASET_PLAN = "dataset_plan.json"  # the plan the run started from (made from the data, or its --plan)
RUN_PLAN = "plan.json"  # the plan this run trains with (after the config's overrides)
RESOLVED_CONFIG = "config.yaml"  # the run config with every default and override resolved
RUN_LOG = "medgn.log"


def write_run_record(out_dir: Path, fold: int) -> None:
    """Record the fold of a new run (``"all"`` or its number)."""
    atomic_write_json(out_dir / RUN_RECORD, {"fold": "all" if fold == ALL_FOLDS else fold}, overwrite=True)


def fold_name(fold: int) -> str:
    """A fold as the user writes it: ``all`` or its number."""
    return "all" if fold == ALL_FOLDS else str(fold)


def recorded_fold(out_dir: Path) -> int | None:
    """The fold a run folder trained on: its run record; for runs from before the record, ``all``
    when it holds no splits (a fold run always has them), else unknown (None)."""
    try:
        fold = json.loads((out_dir / RUN_RECORD).read_text(encoding="utf-8")).get("fold")
    except (OSError, ValueError, AttributeError):
        fold = None
    if isinstance(fold, int) and not isinstance(fold, bool) and fold >= 0:
        return fold
    if fold == "all" or not (out_dir / SPLITS_FILE).exists():
        return ALL_FOLDS
    return None


def check_resumed_fold(out_dir: Path, fold: int) -> None:
    """A resume continues the run's own fold: another would validate on cases it trained on."""
    recorded = recorded_fold(out_dir)
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
