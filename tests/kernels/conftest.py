"""Skips this folder's `@pytest.mark.gpu` tests on machines without a CUDA device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rollout_accel.kernels import backend

_HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def _fresh_backend_overrides():
    """Tests flip the backend variables with monkeypatch: re-read them around every test."""
    backend.reload_overrides()
    yield
    backend.reload_overrides()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU: torch.cuda.is_available() is False")
    for item in items:
        if "gpu" in item.keywords and _HERE in item.path.parents:
            item.add_marker(skip)
