from __future__ import annotations

import pytest

from rollout_accel.serving.engine import Engine


@pytest.fixture(scope="module")
def tiny_engine() -> Engine:
    eng = Engine("tiny-qwen3", max_running_requests=128)
    yield eng
    eng.shutdown()
