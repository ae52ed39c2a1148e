"""A compact GRPO trainer for local runs: advantages, PPO-clip loss, response logprobs, SFT."""

from __future__ import annotations

from rollout_accel.rollout.trainer.grpo import group_advantages, policy_loss
from rollout_accel.rollout.trainer.grpo_step import GRPOConfig, GRPOTrainer
from rollout_accel.rollout.trainer.sequence_logprobs import (
    PackedBatch,
    logits_of,
    pack_batch,
    response_logprobs,
)
from rollout_accel.rollout.trainer.sft import SFTConfig, SFTExample, build_sft_examples, sft_train
from rollout_accel.rollout.trainer.types import TrainSample

__all__ = [
    "GRPOConfig",
    "GRPOTrainer",
    "PackedBatch",
    "SFTConfig",
    "SFTExample",
    "TrainSample",
    "build_sft_examples",
    "group_advantages",
    "logits_of",
    "pack_batch",
    "policy_loss",
    "response_logprobs",
    "sft_train",
]
