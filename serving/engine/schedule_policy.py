"""Waiting-queue order: which waiting requests the scheduler considers first.

Pluggable by name, as SGLang's `--schedule-policy`: `fcfs`, `lpm`, `hrrn` (SGLang's highest
response ratio next) and `slo` (ours: `slo_policy.py`). `order` returns the requests to consider
this step, in order; a waiting request left out of the list waits this step (cache-aware policies
hold back a request whose uncached prefix one ahead of it is computing). Policies read the prefix
cache without locking it; only the scheduler's admission locks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from rollout_accel.serving.engine.prefill_work import QueueClock, SharedPrefixGate, cached_prefix
from rollout_accel.serving.engine.radix_cache import RadixCache
from rollout_accel.serving.engine.request import Request
from rollout_accel.serving.engine.slo_policy import SloSettings, SloWindowPolicy

if TYPE_CHECKING:
    from rollout_accel.serving.engine.config import EngineConfig


class WaitingQueuePolicy(Protocol):
    def order(
        self, waiting: list[Request], cache: RadixCache, clock: QueueClock | None = None
    ) -> list[Request]: ...


class FirstComeFirstServed:
    """Higher `priority` first, then arrival order (retracted requests keep their arrival time)."""

    def order(
        self, waiting: list[Request], cache: RadixCache, clock: QueueClock | None = None
    ) -> list[Request]:
        return sorted(waiting, key=lambda r: (-r.priority, r.arrival_time))


class LongestPrefixMatch:
    """Most cached tokens first, so shared prefixes are computed while still cached.

    Matching every request costs a tree walk each; past `max_queue` waiting requests it falls back
    to FCFS (SGLang does the same).
    """

    def __init__(self, max_queue: int = 128) -> None:
        self.max_queue = max_queue
        self._fcfs = FirstComeFirstServed()

    def order(
        self, waiting: list[Request], cache: RadixCache, clock: QueueClock | None = None
    ) -> list[Request]:
        if len(waiting) > self.max_queue or not cache.enabled:
            return self._fcfs.order(waiting, cache)
        lengths = {id(r): cache.match_length(r.fill_ids) for r in waiting}
        return sorted(waiting, key=lambda r: (-r.priority, -lengths[id(r)], r.arrival_time))


class HighestResponseRatioNext:
    """SGLang's `hrrn`: highest (waited + work) / work first, with token-based aging.

    work = prefill tokens left (fill minus cached prefix); waited = prefill tokens the engine
    computed since the request was first seen waiting (`QueueClock.prefill_tokens`), which equals
    classic HRRN's waited time at constant prefill throughput. A request whose uncached prefix an
    earlier waiting request shares (>= `min_shared_prefix` tokens) goes last this step; past
    `max_queue` waiting requests the order is FCFS. Differences from SGLang: `priority` orders
    first (SGLang's hrrn ignores it), ties go by arrival (SGLang: by rid), and the duplicate check
    looks at every request's uncached part (SGLang: only requests with <= 32 cached tokens).
    """

    def __init__(self, max_queue: int = 128, min_shared_prefix: int = 32) -> None:
        self.max_queue = max_queue
        self.min_shared_prefix = min_shared_prefix
        self._fcfs = FirstComeFirstServed()
        self._first_seen: dict[str, int] = {}

    def order(
        self, waiting: list[Request], cache: RadixCache, clock: QueueClock | None = None
    ) -> list[Request]:
        done = (clock or QueueClock.current()).prefill_tokens
        self._first_seen = {r.rid: self._first_seen.get(r.rid, done) for r in waiting}
        if len(waiting) > self.max_queue or not cache.enabled:
            return self._fcfs.order(waiting, cache)
        by_arrival = sorted(waiting, key=lambda r: r.arrival_time)
        gate = SharedPrefixGate(self.min_shared_prefix)
        work: dict[int, int] = {}
        deferred: set[int] = set()
        for req in by_arrival:
            cached = cached_prefix(req, cache)
            work[id(req)] = req.fill_len - cached
            if gate.follows(req.fill_ids, cached) and req.row is None:
                deferred.add(id(req))

        def key(r: Request) -> tuple[int, bool, float, float]:
            ratio = (done - self._first_seen[r.rid]) / work[id(r)]
            return (-r.priority, id(r) in deferred, -ratio, r.arrival_time)

        return sorted(by_arrival, key=key)


POLICIES: dict[str, str] = {
    "fcfs": "first come first served (priority first)",
    "lpm": "longest cached prefix first",
    "hrrn": "highest response ratio next (SGLang's hrrn)",
    "slo": "cheapest prefill first in a window, TTFT deadlines promoted",
}


def make_policy(name: str, config: EngineConfig | None = None) -> WaitingQueuePolicy:
    """Builds the named policy; `config` supplies the `slo` settings (schedule_window,
    ttft_slo_ms)."""
    if name == "fcfs":
        return FirstComeFirstServed()
    if name == "lpm":
        return LongestPrefixMatch()
    if name == "hrrn":
        return HighestResponseRatioNext()
    if name == "slo":
        if config is None:
            return SloWindowPolicy()
        return SloWindowPolicy(
            SloSettings(
                window=config.schedule_window,
                ttft_slo_ms=config.ttft_slo_ms,
                mix_limit_tokens=config.max_prefill_tokens // 4,
            )
        )
    raise ValueError(f"schedule_policy: {name!r} is not one of {sorted(POLICIES)}")
