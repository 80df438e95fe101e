"""Random-number state: seeding, capture and restore in checkpoint-safe form.

A checkpoint must hold every RNG (python ``random``, numpy's global generator, torch CPU and each
CUDA device) as tensors and JSON-able values only, so ``torch.load(weights_only=True)`` reads it
back. :func:`capture_rng` / :func:`restore_rng` convert to and from that form;
:func:`preserve_rng` runs code (validation, plotting) without disturbing the training stream.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; with ``deterministic`` also force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy's legacy seed range is 32-bit
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic (documented by PyTorch).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def capture_rng() -> dict[str, Any]:
    """Every RNG state of this process as tensors, lists and numbers."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back a state from :func:`capture_rng`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    keys = npst["keys"].numpy().astype(np.uint32)
    np.random.set_state((npst["name"], keys, npst["pos"], npst["has_gauss"], npst["gauss"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        count = min(len(cuda), torch.cuda.device_count())
        torch.cuda.set_rng_state_all(cuda[:count])


@contextlib.contextmanager
def preserve_rng() -> Iterator[None]:
    """Run a block and restore every RNG afterwards, so it leaves the training stream unchanged."""
    saved = capture_rng()
    try:
        yield
    finally:
        restore_rng(saved)
