"""One async interface over many engines: placement, balancing, failure handling, abort.

Every engine speaks SGLang's /generate protocol (payload in, SGLang-shaped dict out) through an
`EngineHandle`: in-process, HTTP, or a Ray actor. The pool
  * keeps all samples of a group on one engine (their shared prompt hits its prefix cache),
  * otherwise places work on the healthy engine with the fewest outstanding tokens,
  * bounds in-flight requests per engine (slime's --sglang-server-concurrency),
  * marks an engine that fails (connection lost, actor killed) unhealthy and re-dispatches its
    requests elsewhere from scratch, so no sample is lost while any engine is alive,
  * re-admits an engine whose handle reports `alive` again (HttpEngine probes its server), and
    while no engine is healthy but some may come back, waits up to `readmit_wait_s` for one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)


class EngineFailure(RuntimeError):
    """The engine itself failed (unreachable, crashed, killed); the request may be retried
    elsewhere. Errors about the request (HTTP 400) are not EngineFailures."""


class NoHealthyEngineError(RuntimeError):
    """Every engine in the pool has failed."""


class EngineHandle(Protocol):
    name: str

    async def generate(self, payload: dict[str, Any]) -> dict[str, Any]: ...

    async def abort_all(self) -> None: ...

    async def num_requests(self) -> int: ...

    async def flush_cache(self) -> None: ...

    async def update_weights_from_tensor(
        self, named_tensors: list, weight_version: str | None
    ) -> None: ...

    async def close(self) -> None: ...


@dataclass
class EngineState:
    handle: EngineHandle
    healthy: bool = True
    outstanding_tokens: int = 0
    in_flight: int = 0
    completed: int = 0
    failures: int = 0
    gate: asyncio.Semaphore | None = None
    limit: int | None = None  # in-flight bound of this engine (None: the pool's)


@dataclass
class PoolStats:
    redispatched: int = 0
    failed_engines: list[str] = field(default_factory=list)
    readmitted_engines: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RequestSpan:
    """One request's life on one engine, for timelines (times from time.perf_counter)."""

    engine: str
    start: float
    end: float
    finish: str  # stop | length | abort | failed
    tokens: int


def supports_drafts(handle: Any) -> bool:
    """Whether an engine handle does speculative decoding from drafts (`supports_drafts()` on
    the handle; handles without it do not)."""
    probe = getattr(handle, "supports_drafts", None)
    return bool(probe()) if callable(probe) else False


def aborted_output(payload: dict[str, Any]) -> dict[str, Any]:
    """The answer for a request aborted before it reached an engine (SGLang's shape)."""
    prompt = payload.get("input_ids") or []
    return {
        "text": "",
        "output_ids": [],
        "meta_info": {
            "id": payload.get("rid"),
            "finish_reason": {"type": "abort", "message": "aborted before dispatch"},
            "prompt_tokens": len(prompt),
            "completion_tokens": 0,
            "cached_tokens": 0,
            "output_token_logprobs": [],
        },
    }


class EnginePool:
    """Routes SGLang /generate payloads to engines; see the module docstring for the rules."""

    def __init__(
        self,
        handles: Sequence[EngineHandle],
        concurrency_per_engine: int = 512,
        readmit_wait_s: float = 30.0,
    ) -> None:
        if not handles:
            raise ValueError("engines: a pool needs at least one engine")
        self.engines = [EngineState(h) for h in handles]
        self.concurrency_per_engine = concurrency_per_engine
        self.readmit_wait_s = readmit_wait_s
        self._affinity: dict[str, int] = {}
        self.stats = PoolStats()
        self.timeline: list[RequestSpan] = []
        self._abort_epoch = 0

    @property
    def healthy(self) -> list[EngineState]:
        self._sync_health()
        return [e for e in self.engines if e.healthy]

    def _sync_health(self) -> None:
        """Follows handles that report their own health (`alive`): down ones are failed, ones
        that answer again are re-admitted."""
        for index, state in enumerate(self.engines):
            alive = getattr(state.handle, "alive", None)
            if alive is None or alive == state.healthy:
                continue
            if alive:
                state.healthy = True
                self.stats.readmitted_engines.append(state.handle.name)
                log.warning("engine %s re-admitted", state.handle.name)
            else:
                self._mark_failed(index, EngineFailure("health probes failed"))

    async def _wait_for_engine(self) -> None:
        """Waits for a probing engine to come back; NoHealthyEngineError if none can or none
        does within `readmit_wait_s`."""
        if not any(getattr(e.handle, "alive", None) is not None for e in self.engines):
            raise NoHealthyEngineError("every engine in the pool has failed")
        deadline = asyncio.get_running_loop().time() + self.readmit_wait_s
        while not self.healthy:
            if asyncio.get_running_loop().time() > deadline:
                raise NoHealthyEngineError(
                    f"every engine in the pool has failed; none came back in {self.readmit_wait_s} s"
                )
            for state in self.engines:  # keep their probes running while we wait
                watch = getattr(state.handle, "watch", None)
                if watch is not None:
                    watch()
            await asyncio.sleep(0.1)

    def _gate(self, state: EngineState) -> asyncio.Semaphore:
        if state.gate is None:  # created lazily inside the running loop
            state.gate = asyncio.Semaphore(state.limit or self.concurrency_per_engine)
        return state.gate

    async def fit_concurrency_to_kv(self, tokens_per_request: float, headroom: float = 0.9) -> None:
        """Per-engine in-flight bound from its KV budget: as many requests of
        `tokens_per_request` (prompt + expected response) as fit in `headroom` of the engine's KV
        slots, never above `concurrency_per_engine`. Engines that do not report a KV capacity
        (`kv_capacity()`) keep the pool's bound. Changes apply to idle engines only, so a
        running step is never re-gated."""
        if tokens_per_request <= 0:
            raise ValueError(f"tokens_per_request: must be > 0, got {tokens_per_request!r}")
        for state in self.healthy:
            probe = getattr(state.handle, "kv_capacity", None)
            if probe is None or state.in_flight:
                continue
            capacity = await self._safe(state, probe(), None)
            if not capacity:
                continue
            limit = max(
                1, min(self.concurrency_per_engine, int(capacity * headroom // tokens_per_request))
            )
            if limit != state.limit:
                state.limit, state.gate = limit, None

    async def abort_request(self, rid: str) -> bool:
        """Aborts one request by id on every healthy engine that can (`abort_request(rid)` on
        the handle); the request then answers with what it produced. False if none could."""
        done = False
        for state in self.healthy:
            abort = getattr(state.handle, "abort_request", None)
            if abort is not None:
                await self._safe(state, abort(rid))
                done = True
        return done

    def place(self, group_key: str | None) -> int:
        """The engine index for a request of `group_key` (sticky per group while healthy)."""
        self._sync_health()
        if group_key is not None:
            index = self._affinity.get(group_key)
            if index is not None and self.engines[index].healthy:
                return index
        candidates = [i for i, e in enumerate(self.engines) if e.healthy]
        if not candidates:
            raise NoHealthyEngineError("every engine in the pool has failed")
        index = min(
            candidates,
            key=lambda i: (self.engines[i].outstanding_tokens, self.engines[i].in_flight),
        )
        if group_key is not None:
            self._affinity[group_key] = index
        return index

    def forget_group(self, group_key: str) -> None:
        self._affinity.pop(group_key, None)

    async def generate(
        self, payload: dict[str, Any], group_key: str | None = None, cost: int = 1
    ) -> dict[str, Any]:
        """Runs one request to completion (or abort) on some healthy engine. A request still
        queued for an engine when `abort_all` is called is answered as aborted without being sent."""
        epoch = self._abort_epoch
        while True:
            try:
                index = self.place(group_key)
            except NoHealthyEngineError:
                await self._wait_for_engine()
                continue
            state = self.engines[index]
            state.outstanding_tokens += cost
            state.in_flight += 1
            start = time.perf_counter()
            try:
                async with self._gate(state):
                    if epoch != self._abort_epoch:
                        return aborted_output(payload)
                    start = time.perf_counter()
                    out = await state.handle.generate(payload)
                state.completed += 1
                meta = out.get("meta_info", {}) if isinstance(out, dict) else {}
                reason = (meta.get("finish_reason") or {}).get("type", "stop")
                self.timeline.append(
                    RequestSpan(
                        state.handle.name,
                        start,
                        time.perf_counter(),
                        reason,
                        meta.get("completion_tokens", 0),
                    )
                )
                return out
            except EngineFailure as exc:
                self.timeline.append(
                    RequestSpan(state.handle.name, start, time.perf_counter(), "failed", 0)
                )
                self._mark_failed(index, exc)
                self.stats.redispatched += 1
            finally:
                state.outstanding_tokens -= cost
                state.in_flight -= 1

    def _mark_failed(self, index: int, exc: Exception) -> None:
        state = self.engines[index]
        state.failures += 1
        mark_down = getattr(state.handle, "mark_down", None)
        if mark_down is not None:  # down until its own probe sees it answer again
            mark_down(str(exc))
        if state.healthy:
            state.healthy = False
            self.stats.failed_engines.append(state.handle.name)
            log.warning(
                "engine %s failed (%s); re-dispatching its requests", state.handle.name, exc
            )
        self._affinity = {k: v for k, v in self._affinity.items() if v != index}

    async def abort_all(self, poll_interval: float = 0.05, timeout: float = 60.0) -> None:
        """Aborts everything in flight, repeating until every healthy engine reports idle (slime's
        abort loop: a request may arrive just after one abort)."""
        self._abort_epoch += 1
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            live = self.healthy
            await asyncio.gather(*(self._safe(e, e.handle.abort_all()) for e in live))
            counts = await asyncio.gather(
                *(self._safe(e, e.handle.num_requests(), 0) for e in live)
            )
            if not any(counts) or asyncio.get_running_loop().time() > deadline:
                return
            await asyncio.sleep(poll_interval)

    async def _safe(self, state: EngineState, coro, default: Any = None) -> Any:
        try:
            return await coro
        except EngineFailure as exc:
            self._mark_failed(self.engines.index(state), exc)
            return default

    async def flush_cache(self) -> None:
        """Empties every engine's prefix cache (between benchmark runs, after weight pushes)."""
        live = self.healthy
        await asyncio.gather(*(self._safe(e, e.handle.flush_cache()) for e in live))

    async def update_weights_from_tensor(
        self, named_tensors: list, weight_version: str | None = None
    ) -> None:
        live = self.healthy
        await asyncio.gather(
            *(
                self._safe(e, e.handle.update_weights_from_tensor(named_tensors, weight_version))
                for e in live
            )
        )

    async def close(self) -> None:
        await asyncio.gather(*(e.handle.close() for e in self.engines), return_exceptions=True)
