"""Which tokens of a prompt come from stored chunks, and which segments to store afterwards.

`plan_reuse` looks every segment up in the chunk store, locks the hits (released by
`ReusePlan.release`, exactly once, also on abort) and lists the misses to store once the prompt's
KV exists. Segments inside the radix prefix need no reuse (their KV is exact) but are stored if
missing; a segment straddling the prefix end reuses its tail.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rollout_accel.serving.kvreuse.blend import ReusedSpan
from rollout_accel.serving.kvreuse.chunk_store import Chunk, ChunkStore
from rollout_accel.serving.kvreuse.segments import Segment


@dataclass(slots=True)
class ReusePlan:
    """Reused spans (ascending, within [prefix_len, L)), segments to store after prefill, and
    the chunks locked for this request."""

    prefix_len: int
    spans: list[ReusedSpan] = field(default_factory=list)
    to_store: list[Segment] = field(default_factory=list)
    locked: list[Chunk] = field(default_factory=list)
    released: bool = False

    @property
    def reused_tokens(self) -> int:
        return sum(len(s) for s in self.spans)

    def release(self, store: ChunkStore) -> None:
        """Unlocks this plan's chunks; a second call does nothing."""
        if self.released:
            return
        for chunk in self.locked:
            store.unlock(chunk)
        self.released = True


def plan_reuse(
    store: ChunkStore, input_ids: Sequence[int], segments: Sequence[Segment], prefix_len: int
) -> ReusePlan:
    """Looks up each segment; hits become locked spans, misses are listed to store later."""
    plan = ReusePlan(prefix_len)
    for start, end in segments:
        tokens = input_ids[start:end]
        if end <= prefix_len:
            if tokens not in store:
                plan.to_store.append((start, end))
            continue
        chunk = store.lookup(tokens)
        if chunk is None:
            plan.to_store.append((start, end))
            continue
        store.lock(chunk)
        plan.locked.append(chunk)
        begin = max(start, prefix_len)
        plan.spans.append(ReusedSpan(begin, end, chunk, begin - start))
    return plan


def store_segments(
    store: ChunkStore, input_ids: Sequence[int], slots: torch.Tensor, plan: ReusePlan
) -> int:
    """Stores the plan's missed segments from the prompt's KV (`slots` [L]); returns how many
    tokens were stored."""
    stored = 0
    for start, end in plan.to_store:
        if store.store(input_ids[start:end], slots[start:end], start) is not None:
            stored += end - start
    return stored
