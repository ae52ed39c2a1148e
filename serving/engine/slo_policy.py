"""The `slo` schedule policy: cheapest prefill first within a window, deadlines promoted.

Agentic and multi-turn traffic mixes continuations whose prompt is mostly cached (a few dozen new
tokens) with fresh long prompts. FCFS makes a continuation wait behind a long fresh prefill; LPM
starves fresh prompts. This policy, each step:

1. urgent first: a request whose wait plus its own predicted prefill time (at the prefill rate
   measured from recent steps) has reached `(1 - promote_margin)` of its TTFT SLO (its own
   `ttft_slo_ms`, else the server default) goes to the front, earliest deadline first;
2. then a window: requests mid-prefill (chunked) or retracted, and the `window` oldest other
   waiting requests, cheapest prefill first: prompt tokens minus the longest cached prefix
   (read without locking, `prefill_work`), or what is left of a chunked prefill;
3. then the rest in arrival order (not scored: the window bounds the per-step lookup cost);
4. last, requests with a negative `priority` (the RL controller's "will be aborted at the target
   anyway" tag, `rollout_accel.rollout.deadline_tags`): never promoted, admitted only with spare
   budget.

Within each group a higher `priority` goes first. Two kinds of request sit out a step (left out of
the order): one whose not-yet-cached prefix a request ahead of it computes this step (it hits the
cache next step), and a non-urgent one with more than `mix_limit_tokens` of prefill while cheaper
ones are admitted: a step's prefill tokens set its duration, and every request in it gets its
first token only at its end, so a long prefill would make the cheap ones' TTFT its own. Long
requests thus spend their slack, not the short ones' (and run at once when nothing cheaper
waits). Bound: once urgent, a request is passed over only by requests with an earlier deadline,
so with a promote margin covering one step plus its own prefill (predicted), no request waits past
its deadline + one step because of reordering; the bench checks it (`rollout bench --scenario
slo`).

`ttft_slo_ms` on /generate is our extension: SGLang has `priority` but no per-request TTFT
deadline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rollout_accel.serving.engine.errors import InvalidRequestError
from rollout_accel.serving.engine.prefill_work import (
    PrefillRate,
    QueueClock,
    SharedPrefixGate,
    cached_prefix,
)
from rollout_accel.serving.engine.radix_cache import RadixCache
from rollout_accel.serving.engine.request import Request


@dataclass(frozen=True, slots=True)
class SloSettings:
    """window: oldest waiting requests scored per step. ttft_slo_ms: the default TTFT SLO.
    promote_margin: share of the SLO kept in reserve when a request is promoted, on top of its
    predicted prefill time (covers the step it waits for and prediction error). min_shared_prefix: shared uncached tokens that make a request wait a step."""

    window: int = 32
    ttft_slo_ms: float = 5000.0
    promote_margin: float = 0.3
    min_shared_prefix: int = 32
    mix_limit_tokens: int = 512

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"schedule_window: must be a positive integer, got {self.window!r}")
        if not self.ttft_slo_ms > 0:
            raise ValueError(f"ttft_slo_ms: must be > 0, got {self.ttft_slo_ms!r}")
        if not 0.0 <= self.promote_margin < 1.0:
            raise ValueError(f"promote_margin: must be in [0, 1), got {self.promote_margin!r}")


def check_schedule_fields(priority: Any, ttft_slo_ms: Any) -> tuple[int, float | None]:
    """Validates a request's `priority` (integer, higher first; negative = deprioritised) and
    `ttft_slo_ms` (positive number of milliseconds, or None for the server default)."""
    if priority is None:
        priority = 0
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidRequestError(f"priority: expected an integer, got {priority!r}")
    if ttft_slo_ms is not None:
        if isinstance(ttft_slo_ms, bool) or not isinstance(ttft_slo_ms, int | float):
            raise InvalidRequestError(f"ttft_slo_ms: expected a number, got {ttft_slo_ms!r}")
        if not math.isfinite(ttft_slo_ms) or ttft_slo_ms <= 0:
            raise InvalidRequestError(f"ttft_slo_ms: must be positive, got {ttft_slo_ms!r}")
        ttft_slo_ms = float(ttft_slo_ms)
    return priority, ttft_slo_ms


def ttft_deadline(req: Request, default_ms: float) -> float:
    """When the request's first token is due (perf_counter seconds)."""
    slo_ms = req.ttft_slo_ms if req.ttft_slo_ms is not None else default_ms
    return req.arrival_time + slo_ms / 1000.0


class SloWindowPolicy:
    """Windowed cheapest-prefill-first with deadline promotion (see the module docstring)."""

    def __init__(self, settings: SloSettings | None = None) -> None:
        self.settings = settings or SloSettings()
        self.rate = PrefillRate()

    def _slo_s(self, req: Request) -> float:
        slo_ms = req.ttft_slo_ms if req.ttft_slo_ms is not None else self.settings.ttft_slo_ms
        return slo_ms / 1000.0

    def _urgent(self, req: Request, now: float, cache: RadixCache, cached: dict[int, int]) -> bool:
        """Promote once the wait plus the request's own predicted prefill time reaches
        (1 - promote_margin) of its SLO; a negative priority is never promoted."""
        if req.priority < 0:
            return False
        due = (1.0 - self.settings.promote_margin) * self._slo_s(req)
        waited = now - req.arrival_time
        if waited >= due:
            return True
        if waited + self.rate.seconds(req.fill_len) < due:
            return False  # even prefilling every token would fit: skip the cache lookup
        cached[id(req)] = cached_prefix(req, cache)
        return waited + self.rate.seconds(req.fill_len - cached[id(req)]) >= due

    def order(
        self, waiting: list[Request], cache: RadixCache, clock: QueueClock | None = None
    ) -> list[Request]:
        clock = clock or QueueClock.current()
        self.rate.observe(clock, waiting)
        default_ms = self.settings.ttft_slo_ms
        cached: dict[int, int] = {}
        urgent: list[Request] = []
        started: list[Request] = []
        fresh: list[Request] = []
        low: list[Request] = []
        for req in waiting:
            if self._urgent(req, clock.now, cache, cached):
                urgent.append(req)
            elif req.row is not None or req.output_ids:
                started.append(req)
            elif req.priority < 0:
                low.append(req)
            else:
                fresh.append(req)
        urgent.sort(key=lambda r: (ttft_deadline(r, default_ms), -r.priority, r.arrival_time))
        fresh.sort(key=lambda r: (-r.priority, r.arrival_time))
        window, rest = started + fresh[: self.settings.window], fresh[self.settings.window :]
        for req in (*urgent, *window):
            if id(req) not in cached:
                cached[id(req)] = cached_prefix(req, cache)
        window.sort(key=lambda r: (-r.priority, r.fill_len - cached[id(r)], r.arrival_time))
        low.sort(key=lambda r: (-r.priority, r.arrival_time))

        gate = SharedPrefixGate(self.settings.min_shared_prefix)
        limit = self.settings.mix_limit_tokens
        ordered: list[Request] = []
        for req in urgent:
            if gate.follows(req.fill_ids, cached[id(req)]) and req.row is None:
                continue  # a request ahead computes this prefix; take it from the cache next step
            ordered.append(req)
        for req in window:
            if gate.follows(req.fill_ids, cached[id(req)]) and req.row is None:
                continue
            if limit and ordered and req.fill_len - cached[id(req)] > limit:
                continue  # not urgent: keep this step short for the cheaper prefills ahead
            ordered.append(req)
        for req in (*rest, *low):
            # Unscored (fill length bounds the work): the same rule keeps long ones out.
            if limit and ordered and req.fill_len > limit:
                continue
            ordered.append(req)
        return ordered
