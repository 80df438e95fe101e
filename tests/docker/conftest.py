"""Marker for the tests that need a built image (``make docker-test``)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "docker: runs containers of a built image (make docker-test)")
