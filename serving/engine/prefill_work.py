"""What prefilling a waiting request would cost now, read from the prefix cache without locking.

Cache-aware schedule policies (`hrrn`, `slo`) score waiting requests by their prefill work: the
tokens the scheduler would still compute if it admitted the request this step (its fill minus the
longest cached prefix). They also hold back a request whose uncached prefix another request ahead
of it is about to compute, so that prefix is computed once and the follower hits the cache a step
later. Nothing here locks, splits or touches the radix tree.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from rollout_accel.serving.engine.radix_cache import RadixCache, common_prefix_len
from rollout_accel.serving.engine.request import Request


@dataclass(frozen=True, slots=True)
class QueueClock:
    """What a policy may know about time when it orders the queue.

    now: `time.perf_counter()` seconds (the clock of `Request.arrival_time`).
    prefill_tokens: prefill tokens the engine has computed so far; monotonic. HRRN ages waiting
    requests by it (work done while they waited), as SGLang does.
    """

    now: float
    prefill_tokens: int = 0

    @classmethod
    def current(cls, prefill_tokens: int = 0) -> QueueClock:
        return cls(time.perf_counter(), prefill_tokens)


def cached_prefix(req: Request, cache: RadixCache) -> int:
    """Tokens of the request's fill that need no compute if it were admitted now: what it has
    already computed (chunked prefill in progress) or the cached prefix it would match. The last
    token is always computed (its logits give the first sampled token), as in `Scheduler._attach`."""
    if req.row is not None:
        return req.num_computed
    return min(cache.peek(req.fill_ids), req.fill_len - 1)


def prefill_work(req: Request, cache: RadixCache) -> int:
    """Tokens the scheduler would still prefill for this request (>= 1 for a waiting request)."""
    return req.fill_len - cached_prefix(req, cache)


class SharedPrefixGate:
    """Finds followers: requests whose not-yet-cached prefix a request ahead of them computes.

    Feed requests in admission order with `follows(tokens, cached)`. A request whose tokens agree
    with an earlier leader's for at least `min_shared` tokens past its own cached prefix is a
    follower (True): admitting it now would compute that shared part twice. Every other request
    becomes a leader. Cost: one slice comparison per (request, leader) pair that shares the first
    uncached token.
    """

    def __init__(self, min_shared: int = 32) -> None:
        self.min_shared = min_shared
        self._leaders: list[list[int]] = []

    def follows(self, tokens: list[int], cached: int) -> bool:
        need = cached + self.min_shared
        if len(tokens) >= need:
            first = tokens[cached]
            for lead in self._leaders:
                if (
                    len(lead) >= need
                    and lead[cached] == first
                    and common_prefix_len(lead, tokens) >= need
                ):
                    return True
        self._leaders.append(tokens)
        return False


class PrefillRate:
    """Prefill tokens per second the engine is achieving now, learnt from successive queue clocks.

    A sample is the prefill work done between two `observe` calls over the time between them; it
    is kept only when a request seen waiting at the earlier call is still waiting (the queue never
    ran dry, so no idle time is in the interval). Exponential average; None until the first
    sample. Mixed steps include decode time, so this underestimates the pure prefill rate: a
    policy using it to predict a request's TTFT errs early, not late.
    """

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.tokens_per_s: float | None = None
        self._last: QueueClock | None = None
        self._last_waiting: set[str] = set()

    def observe(self, clock: QueueClock, waiting: list[Request]) -> None:
        last, self._last = self._last, clock
        rids = {r.rid for r in waiting}
        backlog = bool(self._last_waiting & rids)
        self._last_waiting = rids
        if last is None or not backlog:
            return
        tokens, seconds = clock.prefill_tokens - last.prefill_tokens, clock.now - last.now
        if tokens <= 0 or seconds <= 0:
            return
        sample = tokens / seconds
        prev = self.tokens_per_s
        self.tokens_per_s = sample if prev is None else prev + self.alpha * (sample - prev)

    def seconds(self, tokens: int) -> float:
        """Predicted time to prefill `tokens` at the current rate (0 before any sample)."""
        return tokens / self.tokens_per_s if self.tokens_per_s else 0.0
