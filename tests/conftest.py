"""Shared pytest fixtures and markers: GPU and real-data skips, the Triton interpreter on CPU.

TRITON_INTERPRET must be set before triton is imported, so it is set here, at collection, when
no CUDA device is present: the Triton kernels then run on CPU tensors.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("MPLBACKEND", "Agg")
# Results must not depend on the host CPU: amp/precision "auto" stays fp32 in the tests (also in
# their subprocesses). Tests of the bf16 paths ask for bf16 explicitly or patch the detection.
os.environ.setdefault("MEDGN_CPU_BF16", "0")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Two pytest workers share two cores: one torch thread each avoids oversubscription.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    no_data = pytest.mark.skip(reason=f"real data not found at {SHARED_DATA}")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "data" in item.keywords and not SHARED_DATA.is_dir():
            item.add_marker(no_data)


@pytest.fixture
def shared_data() -> Path:
    """Path of ../shared/data (tests using it carry the `data` marker)."""
    return SHARED_DATA
