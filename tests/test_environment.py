"""The one device rule: cpu, cuda, cuda:N; plain cuda under torchrun is this rank's GPU."""

from __future__ import annotations

import pytest
import torch

from medgn.environment import local_rank, resolve_device
from medgn.errors import UsageError


def test_cpu_and_bad_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match="unknown device"):
        resolve_device("gpu0")
    with pytest.raises(UsageError, match="unsupported device"):
        resolve_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="no CUDA device"):
        resolve_device("cuda:1")


def test_plain_cuda_under_torchrun_is_the_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert local_rank() is None and resolve_device("cuda") == torch.device("cuda")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cuda") == torch.device("cuda", 3)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # an explicit index wins
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(UsageError, match="LOCAL_RANK"):
        local_rank()
