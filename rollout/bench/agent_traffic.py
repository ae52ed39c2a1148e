"""Bursty multi-turn agent traffic: the workload of `rollout bench --scenario slo`.

Agents start in Poisson bursts. Each agent session runs several turns: its first prompt is one of
a few shared system prompts (tool descriptions) plus a task; every later prompt is the previous
prompt + the engine's answer + a tool result, so all but the new tokens are in the prefix cache.
Fresh long prompts (documents to read) arrive in the same bursts and share nothing. Turn k+1 is
sent a think time after turn k's answer arrives (closed loop per session, as agents behave);
bursts, sessions, lengths and think times are fixed by the seed, so every policy gets the same
traffic. Answers have fixed lengths (`max_new_tokens` + `ignore_eos`) so the work does not depend
on which tokens are sampled. Parameters are fixed here and recorded in results; `load` scales
only the burst rate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class AgentTrafficConfig:
    """Lengths in tokens (multiplied by `scale`), times in seconds."""

    duration_s: float = 60.0
    burst_rate: float = 0.3  # bursts per second (the scenario sets it from the load)
    sessions_per_burst: float = 3.0  # Poisson mean, at least one session per burst
    fresh_per_burst: float = 0.6  # Poisson mean
    burst_spread_s: float = 0.5  # a burst's arrivals are spread uniformly over this long
    system_prompts: int = 4
    system_len: int = 512
    task_len: tuple[int, int] = (32, 160)
    turns: tuple[int, int] = (3, 7)
    answer_len: tuple[int, int] = (16, 64)
    tool_len: tuple[int, int] = (16, 192)
    think_s: tuple[float, float] = (0.0, 0.3)
    fresh_len: tuple[int, int] = (1024, 3072)
    fresh_answer_len: tuple[int, int] = (32, 96)
    scale: float = 1.0
    seed: int = 0

    def mean_prefill_tokens_per_burst(self) -> float:
        """Expected prefill work one burst brings (system prompts counted uncached)."""
        s = self.scale
        mid = lambda r: (r[0] + r[1]) / 2  # noqa: E731
        turns = mid(self.turns)
        session = s * (self.system_len + mid(self.task_len) + (turns - 1) * mid(self.tool_len)) + (
            turns - 1
        ) * mid(self.answer_len)
        return self._sessions() * session + self.fresh_per_burst * s * mid(self.fresh_len)

    def mean_decode_tokens_per_burst(self) -> float:
        mid = lambda r: (r[0] + r[1]) / 2  # noqa: E731
        return self._sessions() * mid(self.turns) * mid(
            self.answer_len
        ) + self.fresh_per_burst * mid(self.fresh_answer_len)

    def _sessions(self) -> float:
        return self.sessions_per_burst + float(np.exp(-self.sessions_per_burst))  # max(1, Poisson)


@dataclass(slots=True)
class Turn:
    max_new_tokens: int
    tool_tokens: list[int]  # appended after this turn's answer (the next prompt's new part)
    think_s: float


@dataclass(slots=True)
class Session:
    start_s: float
    prompt: list[int]  # system prompt + task
    system_id: int
    turns: list[Turn] = field(default_factory=list)


@dataclass(slots=True)
class FreshPrompt:
    arrival_s: float
    prompt: list[int]
    max_new_tokens: int


@dataclass(slots=True)
class AgentTraffic:
    config: AgentTrafficConfig
    sessions: list[Session]
    fresh: list[FreshPrompt]

    def describe(self) -> dict[str, Any]:
        cfg = asdict(self.config)
        return {
            "name": "agent-bursts",
            "config": cfg,
            "sessions": len(self.sessions),
            "turns": sum(len(s.turns) for s in self.sessions),
            "fresh_prompts": len(self.fresh),
        }


def make_agent_traffic(config: AgentTrafficConfig, vocab_size: int) -> AgentTraffic:
    """Seeded traffic; token ids are drawn from [4, vocab_size) (low ids are often special)."""
    rng = np.random.default_rng(config.seed)
    s = config.scale

    def tokens(count: int) -> list[int]:
        return rng.integers(4, vocab_size, size=max(1, int(count))).tolist()

    def uniform(bounds: tuple[int, int], scaled: bool = True) -> int:
        lo, hi = bounds
        value = int(rng.integers(lo, hi + 1))
        return max(1, int(value * s)) if scaled else value

    systems = [tokens(config.system_len * s) for _ in range(config.system_prompts)]
    sessions: list[Session] = []
    fresh: list[FreshPrompt] = []
    t = float(rng.exponential(1.0 / config.burst_rate))
    while t < config.duration_s:
        for _ in range(max(1, int(rng.poisson(config.sessions_per_burst)))):
            system_id = int(rng.integers(config.system_prompts))
            start = t + float(rng.uniform(0.0, config.burst_spread_s))
            session = Session(
                start, systems[system_id] + tokens(uniform(config.task_len)), system_id
            )
            for _ in range(uniform(config.turns, scaled=False)):
                session.turns.append(
                    Turn(
                        max_new_tokens=uniform(config.answer_len, scaled=False),
                        tool_tokens=tokens(uniform(config.tool_len)),
                        think_s=float(rng.uniform(*config.think_s)),
                    )
                )
            sessions.append(session)
        for _ in range(int(rng.poisson(config.fresh_per_burst))):
            fresh.append(
                FreshPrompt(
                    t + float(rng.uniform(0.0, config.burst_spread_s)),
                    tokens(uniform(config.fresh_len)),
                    uniform(config.fresh_answer_len, scaled=False),
                )
            )
        t += float(rng.exponential(1.0 / config.burst_rate))
    return AgentTraffic(config, sessions, fresh)
