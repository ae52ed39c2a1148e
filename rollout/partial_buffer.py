"""Groups carried between steps: aborted stragglers (partial rollout) and surplus finished groups.

A group enters whole and leaves whole. Each sample keeps its tokens, logprobs and the weight
version of every segment it was generated under (`Sample.weight_versions`), and its
`metadata["start_rollout_id"]` (slime's key). Staleness = current rollout_id - start_rollout_id;
a group whose stalest sample exceeds `max_staleness` is dropped or restarted from its prompt
(counted either way). Persisted as JSON next to slime's checkpoints.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rollout_accel.rollout.sample_types import Sample, Status

STALE_ACTIONS = ("drop", "restart")


@dataclass(slots=True)
class BufferedGroup:
    key: str
    samples: list[Sample]
    prompt_ids: list[int]
    prompt_meta: dict[str, Any] = field(default_factory=dict)

    @property
    def start_rollout_id(self) -> int:
        starts = [s.metadata.get("start_rollout_id") for s in self.samples]
        known = [s for s in starts if s is not None]
        return min(known) if known else 0

    @property
    def finished(self) -> bool:
        return all(s.status in (Status.COMPLETED, Status.TRUNCATED) for s in self.samples)

    def partial_tokens(self) -> int:
        return sum(s.response_length for s in self.samples)


@dataclass
class BufferStats:
    dropped_groups: int = 0
    dropped_tokens: int = 0
    restarted_groups: int = 0
    restarted_tokens: int = 0


def reset_sample(sample: Sample, prompt_ids: list[int]) -> None:
    """Back to an unstarted sample of the same prompt (staleness `restart`)."""
    sample.tokens = list(prompt_ids)
    sample.response = ""
    sample.response_length = 0
    sample.rollout_log_probs = None
    sample.loss_mask = None
    sample.weight_versions = []
    sample.reward = None
    sample.status = Status.PENDING
    sample.metadata.pop("start_rollout_id", None)
    sample.metadata.pop("segments", None)


class PartialBuffer:
    """FIFO of BufferedGroups with a staleness bound applied when groups are taken out."""

    def __init__(self, max_staleness: int = 1, stale_action: str = "drop") -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness: must be >= 0, got {max_staleness}")
        if stale_action not in STALE_ACTIONS:
            raise ValueError(f"stale_action: {stale_action!r} is not one of {STALE_ACTIONS}")
        self.max_staleness = max_staleness
        self.stale_action = stale_action
        self.groups: list[BufferedGroup] = []
        self.stats = BufferStats()

    def __len__(self) -> int:
        return len(self.groups)

    def add(self, groups: Iterable[BufferedGroup]) -> None:
        self.groups.extend(groups)

    def take(
        self, rollout_id: int, limit: int | None = None, oldest_first: bool = False
    ) -> list[BufferedGroup]:
        """Up to `limit` groups to resume at `rollout_id`, staleness bound applied.
        `oldest_first` orders by start_rollout_id (closest to the bound first)."""
        kept: list[BufferedGroup] = []
        for group in self.groups:
            staleness = rollout_id - group.start_rollout_id
            if staleness <= self.max_staleness or group.partial_tokens() == 0:
                kept.append(group)
                continue
            tokens = group.partial_tokens()
            if self.stale_action == "drop":
                self.stats.dropped_groups += 1
                self.stats.dropped_tokens += tokens
            else:
                for sample in group.samples:
                    reset_sample(sample, group.prompt_ids)
                self.stats.restarted_groups += 1
                self.stats.restarted_tokens += tokens
                kept.append(group)
        if oldest_first:
            kept.sort(key=lambda g: g.start_rollout_id)
        count = len(kept) if limit is None else min(limit, len(kept))
        out, self.groups = kept[:count], kept[count:]
        return out

    def staleness_histogram(self, rollout_id: int) -> dict[int, int]:
        hist: dict[int, int] = {}
        for group in self.groups:
            age = rollout_id - group.start_rollout_id
            hist[age] = hist.get(age, 0) + 1
        return hist

    # -- persistence ------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "max_staleness": self.max_staleness,
            "stale_action": self.stale_action,
            "groups": [
                {
                    "key": g.key,
                    "prompt_ids": g.prompt_ids,
                    "prompt_meta": g.prompt_meta,
                    "samples": [_sample_json(s) for s in g.samples],
                }
                for g in self.groups
            ],
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Atomic write (temp file + rename): a crash never leaves half a buffer."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json()))
        os.replace(tmp, path)
        return path

    def load(self, path: str | os.PathLike[str]) -> None:
        raw = json.loads(Path(path).read_text())
        self.groups = [
            BufferedGroup(
                key=g["key"],
                prompt_ids=list(g["prompt_ids"]),
                prompt_meta=g.get("prompt_meta", {}),
                samples=[Sample.from_dict(s) for s in g["samples"]],
            )
            for g in raw["groups"]
        ]


def _sample_json(sample: Sample) -> dict[str, Any]:
    data = sample.to_dict()
    # slime's Sample carries nested helper objects; keep only JSON-able values.
    return {k: v for k, v in data.items() if _jsonable(v)}


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
