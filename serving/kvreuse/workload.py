"""A multi-agent prompt stream whose text recurs at shifting positions (what KV reuse is for).

k agents work in rounds (slime's multi-agent example: solver -> rewriter -> selector; debate and
tool-using agents look the same). Agent i's prompt in round r is

    [system prompt] [agent i's instructions] [shared documents, shuffled]
    [the other agents' round r-1 outputs, shuffled] [this round's question]

System + instructions repeat per agent (a radix prefix); the documents and outputs recur in other
agents' prompts at other positions and in other orders (a radix cache misses them; chunk reuse
does not); the question is new. Each document and output is a marked segment. Parameters are
fixed per preset and documented; `reusable_share` reports what share of prompt tokens sits in a
segment whose content occurred earlier in the stream.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from rollout_accel.serving.kvreuse.segments import Segment

# (rng, kind, length) -> token ids; kind is system|instruction|document|output|question.
TextSource = Callable[[random.Random, str, int], list[int]]


@dataclass(frozen=True, slots=True)
class MultiAgentConfig:
    """Shape of the stream; token counts are per item."""

    agents: int = 4
    rounds: int = 3
    documents: int = 3
    document_tokens: int = 256
    system_tokens: int = 24
    instruction_tokens: int = 32
    output_tokens: int = 64
    question_tokens: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("agents", "rounds", "document_tokens", "output_tokens", "question_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        for name in ("documents", "system_tokens", "instruction_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class AgentPrompt:
    agent: int
    round: int
    input_ids: list[int]
    segments: list[Segment]
    reusable_tokens: int  # tokens in segments whose content appeared earlier in the stream


def random_tokens(vocab_size: int, low: int = 3) -> TextSource:
    """Uniform random ids in [low, vocab_size) (random-weight presets: content is meaningless)."""

    def source(rng: random.Random, kind: str, length: int) -> list[int]:
        return [rng.randrange(low, vocab_size) for _ in range(length)]

    return source


def multi_agent_stream(
    config: MultiAgentConfig, source: TextSource, prefix: list[int] | None = None
) -> list[AgentPrompt]:
    """The prompts in arrival order (round by round, agent by agent). `prefix` (e.g. a bos id)
    starts every prompt."""
    rng = random.Random(config.seed)
    system = source(rng, "system", config.system_tokens)
    instructions = [
        source(rng, "instruction", config.instruction_tokens) for _ in range(config.agents)
    ]
    documents = [source(rng, "document", config.document_tokens) for _ in range(config.documents)]
    seen: set[tuple[int, ...]] = set()
    prompts: list[AgentPrompt] = []
    previous: list[list[int]] = []
    for rnd in range(config.rounds):
        outputs = [source(rng, "output", config.output_tokens) for _ in range(config.agents)]
        for agent in range(config.agents):
            ids = list(prefix or []) + system + instructions[agent]
            parts = rng.sample(documents, len(documents))
            others = [out for j, out in enumerate(previous) if j != agent]
            parts += rng.sample(others, len(others))
            segments: list[Segment] = []
            reusable = 0
            for part in parts:
                segments.append((len(ids), len(ids) + len(part)))
                key = tuple(part)
                if key in seen:
                    reusable += len(part)
                seen.add(key)
                ids += part
            ids += source(rng, "question", config.question_tokens)
            prompts.append(AgentPrompt(agent, rnd, ids, segments, reusable))
        previous = outputs
    return prompts


def reusable_share(prompts: list[AgentPrompt]) -> float:
    """Share of all prompt tokens that sit in a segment seen earlier in the stream."""
    total = sum(len(p.input_ids) for p in prompts)
    return sum(p.reusable_tokens for p in prompts) / max(total, 1)
