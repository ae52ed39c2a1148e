"""The engine pool: in-process engines, HTTP servers (ours or SGLang), Ray actors."""

from rollout_accel.rollout.pool.base import (
    EngineFailure,
    EngineHandle,
    EnginePool,
    NoHealthyEngineError,
)
from rollout_accel.rollout.pool.http import HttpEngine, expand_router
from rollout_accel.rollout.pool.inprocess import InProcessEngine

__all__ = [
    "EngineFailure",
    "EngineHandle",
    "EnginePool",
    "HttpEngine",
    "InProcessEngine",
    "NoHealthyEngineError",
    "expand_router",
]
