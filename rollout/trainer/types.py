"""What the trainer consumes: one finished response with its rollout logprobs and reward."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(slots=True)
class TrainSample:
    """One response to train on.

    Invariants (checked on construction): `prompt_ids` is non-empty; `rollout_logprobs` and
    `loss_mask` have one entry per response token; `loss_mask` entries are 0 or 1, 0 marking
    tokens left out of the loss (e.g. tokens an older policy produced before a partial rollout
    was resumed). An empty `loss_mask` argument means every response token counts.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    reward: float
    loss_mask: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.prompt_ids) == 0:
            raise ValueError(
                "TrainSample: prompt_ids is empty; the first response token needs a prompt position"
            )
        n = len(self.response_ids)
        if len(self.rollout_logprobs) != n:
            raise ValueError(
                f"TrainSample: {len(self.rollout_logprobs)} rollout_logprobs for {n} response tokens"
            )
        if not self.loss_mask:
            self.loss_mask = [1] * n
        elif len(self.loss_mask) != n:
            raise ValueError(
                f"TrainSample: loss_mask has {len(self.loss_mask)} entries for {n} response tokens"
            )
        if any(m not in (0, 1) for m in self.loss_mask):
            raise ValueError(
                f"TrainSample: loss_mask entries must be 0 or 1, got {sorted(set(self.loss_mask))}"
            )
        if any(tok < 0 for tok in self.prompt_ids) or any(tok < 0 for tok in self.response_ids):
            raise ValueError("TrainSample: token ids must be >= 0")
        if not math.isfinite(self.reward):
            raise ValueError(f"TrainSample: reward must be finite, got {self.reward!r}")
        if any(
            not math.isfinite(lp)
            for lp, m in zip(self.rollout_logprobs, self.loss_mask, strict=True)
            if m
        ):
            raise ValueError(
                "TrainSample: rollout_logprobs of loss-masked-in tokens must be finite"
            )
