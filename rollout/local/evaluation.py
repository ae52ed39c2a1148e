"""Held-out accuracy of the policy as the engine serves it: greedy, one response per problem."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from rollout_accel.rollout.pool import EnginePool
from rollout_accel.rollout.tasks import Problem, Task


@dataclass(frozen=True, slots=True)
class EvalResult:
    """Accuracy (mean exact-match reward), mean response length, accuracy per difficulty."""

    accuracy: float
    response_len: float
    truncated: float
    by_difficulty: dict[int, float] = field(default_factory=dict)

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        out = {
            f"{prefix}accuracy": self.accuracy,
            f"{prefix}response_len": self.response_len,
            f"{prefix}truncated_ratio": self.truncated,
        }
        out.update({f"{prefix}accuracy/d{k}": v for k, v in sorted(self.by_difficulty.items())})
        return out


async def evaluate(
    pool: EnginePool, task: Task, problems: Sequence[Problem], max_new_tokens: int
) -> EvalResult:
    """Greedy accuracy of whatever weights the pool's engines hold now."""
    if not problems:
        raise ValueError("evaluate: no problems")
    payloads = [
        {
            "input_ids": task.encode_prompt(p),
            "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new_tokens},
            "rid": f"eval-{i}",
        }
        for i, p in enumerate(problems)
    ]
    outs = await asyncio.gather(*(pool.generate(p) for p in payloads))
    rewards, lengths, truncated = [], [], 0
    per_difficulty: dict[int, list[float]] = {}
    for problem, out in zip(problems, outs, strict=True):
        ids = list(out.get("output_ids", []))
        # Decode with the task's own tokenizer: the reward must not depend on the engine's text.
        reward = task.reward(problem, task.tokenizer.decode(ids))
        rewards.append(reward)
        lengths.append(len(ids))
        reason = (out.get("meta_info", {}).get("finish_reason") or {}).get("type")
        truncated += reason == "length"
        per_difficulty.setdefault(problem.difficulty, []).append(reward)
    return EvalResult(
        accuracy=statistics.fmean(rewards),
        response_len=statistics.fmean(lengths),
        truncated=truncated / len(problems),
        by_difficulty={k: statistics.fmean(v) for k, v in per_difficulty.items()},
    )
