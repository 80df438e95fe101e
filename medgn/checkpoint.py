"""Checkpoint files: atomic, hash-recorded, data-only, refused loudly when damaged.

A checkpoint is a dict of tensors and JSON-able values (no numpy objects, no dataclasses, no code)
written with ``torch.save`` through :func:`medgn.files.atomic_path`, so ``torch.load(...,
weights_only=True)`` reads it and a crash never leaves half a file at a final name. Each save gets
a new file name in the checkpoint folder (``e0003-i0000750-step.pt``) with a ``.sha256`` sidecar,
then small JSON pointers (``latest.json``, ``best.json``, ``final.json``) are replaced atomically
to name it with its sha256. A crash between any two writes leaves every pointer naming a complete,
verified file. Weights that are not finite are never written. :func:`resolve_checkpoint` is the
one rule for what a folder or pointer names (resume: the latest; inference: best > final >
latest), and :func:`read_checkpoint` reads a file once for both its hash and its contents.
:func:`newest_intact_checkpoint` finds the newest file that still matches its ``.sha256``: what a
resume falls back to without ``latest.json``, and names when the latest file is damaged.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from medgn.errors import ModelError
from medgn.files import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    clean_stale_temps,
    file_sha256,
    path_problem,
)
from medgn.logs import get_logger

FORMAT = "medgn-checkpoint"
FORMAT_VERSION = 1
POINTERS = ("latest", "best", "final")
# Which pointer a folder resolves to: training continues from the latest; inference takes the best
# validated weights, else the final ones, else the latest.
RESUME_ORDER = ("latest",)
INFERENCE_ORDER = ("best", "final", "latest")
# Plain file names other tools (or older runs) leave in a checkpoints folder, in preference order.
PLAIN_NAMES = ("best.pt", "final.pt", "last.pt", "latest.pt")
# The name save_checkpoint gives a file: epoch and iteration first (e0003-i0000750-step.pt).
_SAVED_NAME = re.compile(r"^e(\d+)-i(\d+)-.*\.pt$")

log = get_logger(__name__)


def check_data_only(obj: Any, key: str = "checkpoint") -> None:
    """Refuse anything but tensors, numbers, strings, None and lists/tuples/dicts of them.

    Raises:
        TypeError: a value of another type (a bug in the code that built the state).
    """
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            check_data_only(item, f"{key}[{i}]")
        return
    if isinstance(obj, dict):
        for k, item in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{key}: key {k!r} of type {type(k).__name__} cannot go into a checkpoint")
            check_data_only(item, f"{key}.{k}")
        return
    raise TypeError(f"{key}: {type(obj).__name__} cannot go into a checkpoint (tensors and JSON-able values only)")


def _named_tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a nested state (mappings, lists, tuples) with its dotted name."""
    if isinstance(tree, torch.Tensor):
        yield prefix or "tensor", tree
    elif isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _named_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _named_tensors(v, f"{prefix}[{i}]")


def unusual_tensors(tree: Any) -> list[str]:
    """Tensors of a nested state that are sparse, quantised or complex: not dense and real.

    Loading one into a network would fail later, or silently drop an imaginary part.
    """
    return [
        f"{name} ({t.layout}, {t.dtype})"
        for name, t in _named_tensors(tree)
        if t.layout != torch.strided or t.is_complex() or t.is_quantized
    ]


def nonfinite_tensors(tree: Any) -> list[str]:
    """Names of floating tensors in a nested state that hold NaN or Inf."""
    return [name for name, t in _named_tensors(tree) if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _unique_path(folder: Path, stem: str) -> Path:
    path = folder / f"{stem}.pt"
    n = 1
    while path.exists():
        path = folder / f"{stem}-{n}.pt"
        n += 1
    return path


def save_checkpoint(
    state: dict[str, Any],
    folder: str | os.PathLike[str],
    *,
    tag: str = "step",
    pointers: Iterable[str] = ("latest",),
    keep: int = 2,
) -> Path:
    """Write ``state`` as a new checkpoint file in ``folder`` and point ``pointers`` at it.

    Args:
        state: the checkpoint dict; ``state["model"]`` (and ``"optimizer"``) must be finite.
        folder: checkpoint folder (created if missing).
        tag: word in the file name (``step``, ``epoch``, ``final``).
        pointers: which of ``latest``/``best``/``final`` to update.
        keep: unreferenced checkpoint files kept (newest first); older ones are removed.

    Returns:
        Path of the written checkpoint.

    Raises:
        ModelError: model or optimizer state holds NaN/Inf (nothing is written).
        ResourceError: the disk is full (the previous checkpoint stays intact).
    """
    check_data_only(state)
    bad = nonfinite_tensors({"model": state.get("model"), "optimizer": state.get("optimizer")})
    if bad:
        raise ModelError(
            folder,
            "refusing to save a checkpoint with non-finite weights",
            got=", ".join(bad[:5]),
            expected="finite tensors",
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    counters = state.get("counters", {})
    stem = f"e{int(counters.get('epoch', 0)):04d}-i{int(counters.get('iteration', 0)):07d}-{tag}"
    path = _unique_path(folder, stem)
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **state}, tmp)
        sha = file_sha256(tmp)
    atomic_write_text(path.with_name(path.name + ".sha256"), f"{sha}  {path.name}\n")
    record = {"file": path.name, "sha256": sha, "epoch": counters.get("epoch"), "iteration": counters.get("iteration")}
    for name in pointers:
        if name not in POINTERS:
            raise ValueError(f"unknown checkpoint pointer {name!r}; expected one of {POINTERS}")
        atomic_write_json(folder / f"{name}.json", record)
    prune_checkpoints(folder, keep=keep)
    return path


def read_pointer(folder: str | os.PathLike[str], name: str = "latest") -> dict[str, Any] | None:
    """The record of pointer ``name`` in ``folder``, or None when absent."""
    path = Path(folder) / f"{name}.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(
            path, f"unreadable checkpoint pointer ({exc})", expected="a JSON file written by medgn"
        ) from exc
    if not isinstance(record, dict) or not isinstance(record.get("file"), str) or "/" in record["file"]:
        raise ModelError(path, "malformed checkpoint pointer", got=record, expected='{"file": NAME, "sha256": HEX}')
    return record


def prune_checkpoints(folder: str | os.PathLike[str], *, keep: int = 2) -> list[Path]:
    """Remove checkpoint files no pointer names, beyond the newest ``keep``; returns what was removed."""
    folder = Path(folder)
    clean_stale_temps(folder)
    referenced = {rec["file"] for name in POINTERS if (rec := read_pointer(folder, name))}
    files = sorted((p for p in folder.glob("e*-i*.pt")), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    removed = []
    for path in [p for p in files if p.name not in referenced][keep:]:
        for victim in (path, path.with_name(path.name + ".sha256")):
            victim.unlink(missing_ok=True)
        removed.append(path)
    return removed


def checkpoint_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The checkpoint files :func:`save_checkpoint` wrote in ``folder``, newest first.

    Newest means the most steps (then epochs) by the file name, then the latest modification time.
    """

    def order(path: Path) -> tuple[int, int, int]:
        match = _SAVED_NAME.match(path.name)
        steps, epochs = (int(match.group(2)), int(match.group(1))) if match else (-1, -1)
        return steps, epochs, path.stat().st_mtime_ns

    folder = Path(folder)
    if not folder.is_dir():
        return []
    files = [p for p in folder.iterdir() if _SAVED_NAME.match(p.name) and p.is_file() and not p.is_symlink()]
    return sorted(files, key=order, reverse=True)


def newest_intact_checkpoint(folder: str | os.PathLike[str], exclude: Iterable[str] = ()) -> Path | None:
    """The newest checkpoint file in ``folder`` whose bytes match its ``.sha256`` file, or None.

    A file without its ``.sha256`` (written last, after the file itself) cannot be shown intact and
    is passed over; so are the file names in ``exclude``.
    """
    skip = set(exclude)
    for path in checkpoint_files(folder):
        sidecar = path.with_name(path.name + ".sha256")
        if path.name in skip or not sidecar.is_file():
            continue
        try:
            words = sidecar.read_text(encoding="utf-8").split()
            if words and file_sha256(path) == words[0]:
                return path
        except (OSError, UnicodeDecodeError):
            continue
    return None


def resolve_checkpoint(path: str | os.PathLike[str], prefer: Sequence[str] = RESUME_ORDER) -> tuple[Path, str | None]:
    """The checkpoint file and expected sha256 for a file, a pointer JSON or a run/checkpoints folder.

    The one resolution rule: a folder (its ``checkpoints/`` first) resolves to the first pointer of
    ``prefer`` found there (``RESUME_ORDER``: the latest, to continue training;
    ``INFERENCE_ORDER``: best > final > latest, to predict), then, for inference, to a plain file
    name other tools leave (``PLAIN_NAMES``).

    Raises:
        ModelError: a folder without any of them, or a pointer file that does not exist.
    """
    path = Path(path)
    if path.is_dir():
        folders = [path / "checkpoints", path] if (path / "checkpoints").is_dir() else [path]
        plain = PLAIN_NAMES if tuple(prefer) != RESUME_ORDER else ()
        for folder in folders:
            for name in prefer:
                record = read_pointer(folder, name)
                if record is not None:
                    return folder / record["file"], record.get("sha256")
            for name in plain:
                if (folder / name).is_file():
                    return folder / name, None
        looked = [str(f / f"{n}.json") for f in folders for n in prefer]
        raise ModelError(path, "no checkpoint in this folder", expected="one of " + ", ".join(looked + list(plain)))
    if path.suffix == ".json":
        record = read_pointer(path.parent, path.stem)
        if record is None:
            raise _missing(path, "checkpoint pointer")
        return path.parent / record["file"], record.get("sha256")
    sidecar = path.with_name(path.name + ".sha256")
    expected = None
    if sidecar.is_file():
        try:
            words = sidecar.read_text(encoding="utf-8").split()
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelError(sidecar, f"unreadable checkpoint hash file ({exc})", expected="a sha256 in hex") from None
        expected = words[0] if words else None
    return path, expected


def _missing(path: Path, what: str) -> ModelError:
    """The error for a checkpoint path that is not a regular file, saying what it is instead."""
    problem = path_problem(path) or "a folder"
    if problem == "not found":
        return ModelError(path, f"{what} not found", expected="an existing file")
    kind = "checkpoint" if what == "checkpoint file" else what
    return ModelError(
        path, f"{kind} path is {problem}", expected="a regular file written by medgn train, or a run folder"
    )


def load_checkpoint(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu", verify: bool = True
) -> dict[str, Any]:
    """Load a checkpoint safely; see :func:`read_checkpoint` (which also returns the file and its hash)."""
    return read_checkpoint(path, map_location=map_location, verify=verify)[0]


def _load_failure(exc: BaseException) -> str:
    """The reason in torch's load error: what its safe unpickler refused (a global, an opcode),
    without the paragraph about ``weights_only`` around it; else the first line."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    if text.startswith("Weights only load failed"):
        body = text.split("Check the documentation")[0].split("Please use `torch.serialization")[0]
        lines = [line for line in body.splitlines() if line.strip()][1:]
        detail = " ".join(" ".join(lines).split("WeightsUnpickler error:")[-1].split())
        if detail:
            return f"refused by the safe loader: {detail}"[:200]
    return text.splitlines()[0][:200]


def read_checkpoint(
    path: str | os.PathLike[str],
    *,
    map_location: str | torch.device = "cpu",
    verify: bool = True,
    prefer: Sequence[str] = RESUME_ORDER,
) -> tuple[dict[str, Any], Path, str]:
    """Load a checkpoint safely (``weights_only=True``), checking its recorded sha256.

    The file is read once: the same bytes are hashed and unpickled.

    Returns:
        (state, the checkpoint file, its sha256).

    Args:
        path: a checkpoint file, a pointer (``latest.json``) or a run/checkpoint folder.
        map_location: where tensors go.
        verify: compare the file with its recorded sha256 when one is recorded.

    Raises:
        ModelError: missing, truncated, corrupt, hash mismatch, code inside the pickle, or not a
            medgn checkpoint; the message names the file.
    """
    file, expected = resolve_checkpoint(path, prefer)
    if not file.is_file():  # named, never opened: reading a FIFO or a device could block or never end
        raise _missing(file, "checkpoint file")
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ModelError(file, f"cannot read checkpoint ({exc.strerror or exc})") from None
    actual = hashlib.sha256(raw).hexdigest()
    if verify and expected and actual != expected:
        raise ModelError(
            file,
            "checkpoint does not match its recorded sha256 (corrupt or replaced)",
            got=actual[:16],
            expected=expected[:16],
        )
    try:
        state = torch.load(io.BytesIO(raw), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        if not (raw[:4] == b"PK\x03\x04" or raw[:1] == b"\x80"):  # neither torch's zip format nor a pickle
            raise ModelError(
                file,
                "not a PyTorch checkpoint",
                got=f"a file starting with {raw[:8]!r}",
                expected="a .pt file written by medgn train, or a run folder",
            ) from exc
        reason = _load_failure(exc)
        raise ModelError(
            file,
            f"cannot load checkpoint safely ({reason})",
            expected="an intact medgn checkpoint with tensors and plain values only",
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = type(state).__name__ if not isinstance(state, dict) else f"keys {sorted(map(str, state))[:6]}"
        raise ModelError(file, "not a medgn checkpoint", got=got, expected=f"a dict with format={FORMAT!r}")
    version = state.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ModelError(file, "invalid checkpoint format_version", got=version, expected="an integer")
    if version > FORMAT_VERSION:
        raise ModelError(
            file,
            "checkpoint written by a newer medgn",
            got=version,
            expected=f"format_version <= {FORMAT_VERSION}",
        )
    unusual = unusual_tensors(state.get("model", {}))
    if unusual:
        raise ModelError(
            file,
            "checkpoint holds weights that are not dense real tensors",
            got=", ".join(unusual[:5]),
            expected="dense float (or integer buffer) tensors",
        )
    bad = nonfinite_tensors(state.get("model", {}))
    if bad:
        raise ModelError(file, "checkpoint holds non-finite weights", got=", ".join(bad[:5]), expected="finite tensors")
    log.debug("loaded checkpoint %s", file)
    return state, file, actual
