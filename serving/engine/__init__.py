"""The engine: requests, paged KV pool, radix prefix cache, scheduler, model runner, sampler."""

from rollout_accel.serving.engine.config import EngineConfig
from rollout_accel.serving.engine.engine import Engine
from rollout_accel.serving.engine.errors import (
    EngineClosedError,
    EngineDeadError,
    EngineError,
    InvalidRequestError,
    RequestNotFoundError,
)
from rollout_accel.serving.engine.sampling_params import SamplingParams

__all__ = [
    "Engine",
    "EngineClosedError",
    "EngineConfig",
    "EngineDeadError",
    "EngineError",
    "InvalidRequestError",
    "RequestNotFoundError",
    "SamplingParams",
]
