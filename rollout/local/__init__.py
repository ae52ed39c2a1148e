"""Local RL runs on one machine: SFT warm start, then GRPO with any rollout policy (CPU-sized)."""

from __future__ import annotations

from rollout_accel.rollout.local.checkpoint import (
    build_model,
    ensure_sft_checkpoint,
    load_policy,
    model_config,
    save_policy_dir,
    sft_cache_dir,
)
from rollout_accel.rollout.local.evaluation import EvalResult, evaluate
from rollout_accel.rollout.local.loop import (
    EvalPoint,
    RunResult,
    build_engine,
    push_weights,
    run_recipe,
    train_groups,
)

__all__ = [
    "EvalPoint",
    "EvalResult",
    "RunResult",
    "build_engine",
    "build_model",
    "ensure_sft_checkpoint",
    "evaluate",
    "load_policy",
    "model_config",
    "push_weights",
    "run_recipe",
    "save_policy_dir",
    "sft_cache_dir",
    "train_groups",
]
