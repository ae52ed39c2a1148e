"""SFT warm start: teach the model the task's output format before RL.

A random-weight model almost never writes `...#answer<eos>`, so every GRPO group would have zero
reward variance. A short SFT on reference solutions gives RL something to sharpen. The loss is
cross-entropy on the solution tokens only (the prompt is context), averaged per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rollout_accel.rollout.tasks.base import Problem, Task
from rollout_accel.rollout.trainer.sequence_logprobs import pack_batch, response_logprobs


@dataclass(frozen=True, slots=True)
class SFTExample:
    """Token ids of one example: the prompt (context only) and the target it is trained to emit."""

    prompt_ids: list[int]
    target_ids: list[int]


@dataclass(frozen=True, slots=True)
class SFTConfig:
    """AdamW on batches drawn (seeded, without replacement within an epoch) from the examples."""

    steps: int = 100
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = 1.0
    pad_id: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"SFTConfig: steps must be an int >= 1, got {self.steps!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"SFTConfig: batch_size must be an int >= 1, got {self.batch_size!r}")
        if not self.lr > 0:
            raise ValueError(f"SFTConfig: lr must be > 0, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"SFTConfig: weight_decay must be >= 0, got {self.weight_decay!r}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"SFTConfig: max_grad_norm must be > 0, got {self.max_grad_norm!r}")


def build_sft_examples(task: Task, problems: Sequence[Problem]) -> list[SFTExample]:
    """Examples from `task.sft_example`: prompt ids as `task.encode_prompt`, then solution + eos."""
    examples = []
    for problem in problems:
        prompt_ids = task.encode_prompt(problem)
        full_ids = [task.tokenizer.bos_id, *task.tokenizer.encode(task.sft_example(problem))]
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError(
                f"{task.name}: sft_example of {problem.key!r} does not start with its prompt"
            )
        examples.append(SFTExample(prompt_ids=prompt_ids, target_ids=full_ids[len(prompt_ids) :]))
    return examples


def sft_train(
    model: nn.Module, examples: Sequence[SFTExample], config: SFTConfig | None = None
) -> list[float]:
    """Train `model` in place for `config.steps` steps; returns the loss of every step.

    `model(input_ids [B, T])` must return logits `[B, T, V]`.
    """
    config = config if config is not None else SFTConfig()
    if len(examples) == 0:
        raise ValueError("sft_train: no examples")
    if any(len(ex.target_ids) == 0 for ex in examples):
        raise ValueError("sft_train: every example needs at least one target token")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("sft_train: the model has no trainable parameters")
    device = params[0].device
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    losses = []
    model.train()
    for _ in range(config.steps):
        picked = []
        while len(picked) < min(config.batch_size, len(examples)):
            if not order:
                order = torch.randperm(len(examples), generator=generator).tolist()
            picked.append(examples[order.pop()])
        batch = pack_batch(
            [ex.prompt_ids for ex in picked],
            [ex.target_ids for ex in picked],
            config.pad_id,
            device,
        )
        logprobs, _ = response_logprobs(model, batch)
        loss = -logprobs.sum() / batch.response_mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses
