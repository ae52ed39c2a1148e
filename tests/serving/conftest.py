from __future__ import annotations

from pathlib import Path

import pytest

from rollout_accel.serving.engine import Engine
from rollout_accel.serving.models import materialize_preset


@pytest.fixture(scope="session")
def preset_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """HF-layout copies of the tiny presets (seed 0), readable by transformers and by us."""
    root = tmp_path_factory.mktemp("presets")
    return {
        name: materialize_preset(name, root / name)
        for name in ("tiny-qwen3", "tiny-qwen2", "tiny-llama")
    }


@pytest.fixture(scope="module")
def engine() -> Engine:
    eng = Engine("tiny-qwen3", max_running_requests=64)
    yield eng
    eng.shutdown()
