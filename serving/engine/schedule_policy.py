"""Waiting-queue order: which waiting requests the scheduler considers first.

Pluggable by name (`fcfs`, `lpm`); an SLO-aware policy slots in by registering another class.
"""

from __future__ import annotations

from typing import Protocol

from rollout_accel.serving.engine.radix_cache import RadixCache
from rollout_accel.serving.engine.request import Request


class WaitingQueuePolicy(Protocol):
    def order(self, waiting: list[Request], cache: RadixCache) -> list[Request]: ...


class FirstComeFirstServed:
    """Higher `priority` first, then arrival order (retracted requests keep their arrival time)."""

    def order(self, waiting: list[Request], cache: RadixCache) -> list[Request]:
        return sorted(waiting, key=lambda r: (-r.priority, r.arrival_time))


class LongestPrefixMatch:
    """Most cached tokens first, so shared prefixes are computed while still cached.

    Matching every request costs a tree walk each; past `max_queue` waiting requests it falls back
    to FCFS (SGLang does the same).
    """

    def __init__(self, max_queue: int = 128) -> None:
        self.max_queue = max_queue
        self._fcfs = FirstComeFirstServed()

    def order(self, waiting: list[Request], cache: RadixCache) -> list[Request]:
        if len(waiting) > self.max_queue or not cache.enabled:
            return self._fcfs.order(waiting, cache)
        lengths = {id(r): cache.match_length(r.fill_ids) for r in waiting}
        return sorted(waiting, key=lambda r: (-r.priority, -lengths[id(r)], r.arrival_time))


POLICIES: dict[str, type] = {"fcfs": FirstComeFirstServed, "lpm": LongestPrefixMatch}


def make_policy(name: str) -> WaitingQueuePolicy:
    if name not in POLICIES:
        raise ValueError(f"schedule_policy: {name!r} is not one of {sorted(POLICIES)}")
    return POLICIES[name]()
