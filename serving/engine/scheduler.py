"""Continuous batching: which tokens the next step computes, and what a finished step means.

`schedule()` builds the next batch: every decode-ready request advances one token, and waiting
requests are prefilled (in chunks) in the same batch up to the token budget. `process(handle)`
takes a launched step's results: appends tokens, caches prompts, applies the finishing rules and
releases finished requests. Between the two, a step may be in flight: the scheduler then counts
its tokens as `inflight` and schedules the next step from them without waiting (overlap).
Runs on the engine thread only; nothing here is thread-safe by design.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rollout_accel.serving.engine.batch import Batch, ForwardItem, StepHandle
from rollout_accel.serving.engine.kv_pool import OutOfSlotsError, RequestTable, SlotAllocator
from rollout_accel.serving.engine.prefill_work import QueueClock
from rollout_accel.serving.engine.radix_cache import RadixCache
from rollout_accel.serving.engine.request import Request, RequestStatus
from rollout_accel.serving.engine.schedule_policy import WaitingQueuePolicy
from rollout_accel.serving.engine.stop_rules import StopRules
from rollout_accel.serving.spec.verify_step import (
    forces_sync,
    plan_drafts,
    schedule_verify,
    settle_verified,
)

Emit = Callable[[Request, bool], None]
_FINISHED = RequestStatus.FINISHED
_RUNNING = RequestStatus.RUNNING


@dataclass(slots=True)
class SchedulerLimits:
    max_running_requests: int
    max_prefill_tokens: int
    context_length: int


@dataclass(slots=True)
class SchedulerStats:
    prefill_tokens: int = 0
    cached_prompt_tokens: int = 0
    prompt_tokens: int = 0
    decode_tokens: int = 0
    retractions: int = 0
    steps: int = 0
    isolated_failures: int = 0


class Scheduler:
    """Owns every live request, the slot allocator, the request table and the radix cache.

    `emit(request, finished)` delivers outputs (stream chunks and final results) to callers.
    """

    def __init__(
        self,
        allocator: SlotAllocator,
        table: RequestTable,
        cache: RadixCache,
        policy: WaitingQueuePolicy,
        limits: SchedulerLimits,
        stop_rules: StopRules,
        emit: Emit,
    ) -> None:
        self.allocator = allocator
        self.table = table
        self.cache = cache
        self.policy = policy
        self.limits = limits
        self.stop_rules = stop_rules
        self.emit = emit
        self.waiting: list[Request] = []
        self.running: dict[str, Request] = {}
        self.by_rid: dict[str, Request] = {}
        self.stats = SchedulerStats()
        # Requests suspected of failing a step: scheduled one at a time until each has passed a
        # step alone (or failed alone, and is failed by itself).
        self.suspects: list[Request] = []
        self._finished: list[Request] = []
        self._prefilling: dict[int, int] = {}  # prompt hash -> last chunks in flight
        self.kvreuse: Any = None  # serving.kvreuse.engine_hook.KVReuse when enabled
        self.spec: Any = None  # serving.spec.SpecState when speculative decoding is on

    # -- queue management -------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.by_rid[req.rid] = req
        self.waiting.append(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, rid: str) -> bool:
        req = self.by_rid.get(rid)
        if req is None:
            return False
        self.finish(req, {"type": "abort", "message": "Abort request."})
        self.release_finished()
        return True

    def abort_all(self, message: str = "Abort all requests.") -> int:
        reqs = list(self.by_rid.values())
        for req in reqs:
            self.finish(req, {"type": "abort", "message": message})
        self.release_finished()
        return len(reqs)

    def retract_all(self) -> int:
        """Pause mode `retract`: running requests give back their KV (kept in the prefix cache)
        and wait; they resume by recompute."""
        moved = list(self.running.values())
        for req in moved:
            self._retract(req)
        return len(moved)

    def flush_cache(self) -> bool:
        """Empties the prefix cache; refused (False) while any request holds KV."""
        if self.running or any(r.row is not None for r in self.waiting):
            return False
        self.cache.flush()
        if self.kvreuse is not None:
            self.kvreuse.flush()
        return True

    def loads(self) -> dict[str, Any]:
        extra = {} if self.kvreuse is None else {"kvreuse": self.kvreuse.loads()}
        return {
            **extra,
            "num_running_reqs": len(self.running),
            "num_waiting_reqs": len(self.waiting),
            "num_used_tokens": self.allocator.num_used,
            "num_cached_tokens": self.cache.cached_slots,
            "max_total_num_tokens": self.allocator.capacity,
        }

    # -- scheduling -------------------------------------------------------------------------
    def schedule(self, in_flight: bool = False) -> Batch | None:
        """The next batch, or None when nothing can run now. With `in_flight`, a step is
        launched but not processed; None then also means "process it first" (a request needs
        its history on the host, or KV must be reclaimed by retraction)."""
        if self.suspects:
            return self._schedule_suspect(in_flight)
        if self.kvreuse is not None and (batch := self.kvreuse.schedule(self, in_flight)):
            return self._commit(batch)
        decode = self._decode_candidates(in_flight)
        if decode is None:
            return None
        drafts = plan_drafts(self, decode)
        if drafts is not None and (verify := schedule_verify(self, decode, drafts)) is not None:
            return verify
        decode_slots = self._alloc(len(decode)) if decode else torch.empty(0, dtype=torch.int64)
        if decode_slots is None:
            if in_flight:
                return None
            decode = self._retract_for(decode)
            decode_slots = self._alloc(len(decode)) if decode else torch.empty(0, torch.int64)
            assert decode_slots is not None
        items = [ForwardItem(r, r.num_computed, 1, True, False) for r in decode]
        prefill_items, prefill_slots = self._schedule_prefill(len(decode))
        items += prefill_items
        if not items:
            return None
        slots = torch.cat([decode_slots, *prefill_slots]) if prefill_slots else decode_slots
        return self._commit(Batch(items, slots, len(decode)))

    def _decode_candidates(self, in_flight: bool) -> list[Request] | None:
        limit = self.limits.context_length
        ready = []
        for r in self.running.values():
            # Request.decode_ready, inlined: this runs for every running request every step.
            produced = len(r.output_ids) + r.inflight
            seq_len = len(r.input_ids) + produced
            if (
                r.status is _RUNNING
                and r.num_computed == seq_len - 1
                and produced < r.params.max_new_tokens
                and seq_len < limit
            ):
                ready.append(r)
        if forces_sync(self.spec, in_flight, ready):
            return None  # a row may draft: its last token must reach the host first
        if in_flight and any(r.inflight and r.needs_host_history for r in ready):
            return None
        return ready

    def _retract_for(self, decode: list[Request]) -> list[Request]:
        """Retracts the newest requests until the rest fit (nothing may be in flight)."""
        decode = list(decode)
        while decode:
            if len(decode) > self.allocator.num_free:
                self._evict(len(decode) - self.allocator.num_free)
            if len(decode) <= self.allocator.num_free:
                return decode
            if len(decode) == 1:
                raise OutOfSlotsError(
                    "max_total_tokens: the KV cache cannot hold even one running request"
                )
            victim = max(decode, key=lambda r: r.arrival_time)
            self._retract(victim)
            self.stats.retractions += 1
            decode.remove(victim)
        return decode

    def _schedule_prefill(
        self, num_decode: int, candidates: list[Request] | None = None
    ) -> tuple[list[ForwardItem], list[torch.Tensor]]:
        if not self.waiting:
            return [], []
        if candidates is None:
            clock = QueueClock.current(self.stats.prefill_tokens)
            candidates = self.policy.order(self.waiting, self.cache, clock)
        budget = self.limits.max_prefill_tokens
        items: list[ForwardItem] = []
        slot_parts: list[torch.Tensor] = []
        in_batch: set[int] = set()
        active = len(self.running)
        for req in candidates:
            if budget <= 0:
                break
            if self.kvreuse is not None and self.kvreuse.claims(req):
                continue  # prefilled whole by the KV-reuse path
            if req.row is None:
                if active >= self.limits.max_running_requests or self.table.num_free == 0:
                    continue
                key = hash(tuple(req.input_ids))
                if key in in_batch or key in self._prefilling:
                    # An identical prompt is being computed: wait and take it from the prefix
                    # cache instead of computing it twice.
                    continue
                self._attach(req)
                in_batch.add(key)
            active += 1
            count = min(req.remaining_prefill(), budget)
            slots = self._alloc(count)
            if slots is None:
                if not items and not self.running and not num_decode:
                    count = min(count, self.allocator.num_free)
                    slots = self._alloc(count) if count > 0 else None
                if slots is None:
                    break
            emits = req.num_computed + count == req.fill_len
            items.append(
                ForwardItem(
                    req,
                    req.num_computed,
                    count,
                    emits,
                    True,
                    wants_input_logprobs=req.logprob_start_len >= 0
                    and req.num_computed < len(req.input_ids),
                )
            )
            slot_parts.append(slots)
            budget -= count
        return items, slot_parts

    def _schedule_suspect(self, in_flight: bool) -> Batch | None:
        """Runs the first suspect alone (the engine processes it before anything else)."""
        if in_flight:
            return None
        while self.suspects and self.suspects[0].finished:
            self.suspects.pop(0)
        if not self.suspects:
            return self.schedule()
        req = self.suspects[0]
        if req.status is RequestStatus.RUNNING and req.decode_ready:
            slots = self._alloc(1)
            if slots is None:
                self._retract_for([req])
                slots = self._alloc(1)
            assert slots is not None
            return self._commit(
                Batch([ForwardItem(req, req.num_computed, 1, True, False)], slots, 1)
            )
        items, parts = self._schedule_prefill(0, [req] if req in self.waiting else [])
        if not items:
            self.suspects.pop(0)  # nothing to run for it now; it rejoins the normal schedule
            return self.schedule()
        return self._commit(Batch(items, torch.cat(parts), 0))

    def _commit(self, batch: Batch) -> Batch:
        """Books the batch: slots into the table, KV counted, emitted tokens counted in flight."""
        offset = 0
        decode_rows, decode_pos = [], []
        for item in batch.items:
            req = item.request
            assert req.row is not None
            if item.is_prefill or item.draft:
                self.table.note(req.row, item.start, batch.slots[offset : offset + item.count])
            else:
                decode_rows.append(req.row)
                decode_pos.append(item.start)
            offset += item.count
            req.num_computed = item.start + item.count
            if item.emits_token:
                req.inflight += 1
                if item.is_prefill:
                    req.status = RequestStatus.RUNNING
                    self.waiting.remove(req)
                    self.running[req.rid] = req
                    key = hash(tuple(req.input_ids))
                    self._prefilling[key] = self._prefilling.get(key, 0) + 1
        if decode_rows:
            nd = batch.num_decode
            self.table.note_positions(
                np.asarray(decode_rows, dtype=np.int64),
                np.asarray(decode_pos, dtype=np.int64),
                batch.slots[:nd].numpy(),
            )
        batch.num_tokens = offset
        batch.rows = np.fromiter((it.request.row for it in batch.items), np.int64, len(batch.items))
        self.stats.steps += 1
        return batch

    def rollback(self, batch: Batch) -> None:
        """Undoes `_commit` for a batch whose step failed before producing results: KV counts
        go back, its slots are freed, prompts that were completing wait again."""
        offset = 0
        freed: list[torch.Tensor] = []
        for item in batch.items:
            req = item.request
            freed.append(batch.slots[offset : offset + item.count])
            offset += item.count
            req.num_computed = item.start
            if item.emits_token:
                req.inflight -= 1
                if item.is_prefill:
                    self._done_prefilling(req)
                    if req.rid in self.running and not req.finished:
                        del self.running[req.rid]
                        req.status = RequestStatus.WAITING
                        self.waiting.insert(0, req)
        if freed:
            self.allocator.free(torch.cat(freed))

    # -- results ----------------------------------------------------------------------------
    def process(self, handle: StepHandle) -> None:
        """Applies a launched step's results (waits for them first)."""
        result = handle.wait()
        batch = handle.batch
        items = batch.items
        now = time.perf_counter()
        nd = batch.num_decode
        self.stats.decode_tokens += nd
        # Decode rows first (all emit, one token each): the hot path, kept lean.
        check, emit = self.stop_rules.check, self.emit
        for item, token, logprob in zip(items[:nd], result.tokens, result.logprobs, strict=False):
            req = item.request
            req.inflight -= 1
            if req.status is _FINISHED:
                continue  # finished at an earlier step; this token was computed ahead for nothing
            try:
                if req.first_token_time is None:
                    req.first_token_time = now
                req.output_ids.append(token)
                req.output_logprobs.append(logprob)
                reason = check(req, token)
                if reason is not None:
                    self.finish(req, reason)
                elif req.stream and req.sink is not None:
                    emit(req, False)
            except Exception as exc:  # one request's bookkeeping must not fail the others
                self.fail(req, exc)
        sampled = nd
        # Then prefill rows and speculative verify rows (their first token here, the accepted
        # rest in settle_verified below).
        for index in range(nd, len(items)):
            item = items[index]
            req = item.request
            if item.is_prefill:
                self.stats.prefill_tokens += item.count
            else:
                self.stats.decode_tokens += 1
            if index in result.input_logprobs:
                req.record_input_logprobs(item.start + 1, result.input_logprobs[index])
            if not item.emits_token:
                continue
            token, logprob = result.tokens[sampled], result.logprobs[sampled]
            sampled += 1
            req.inflight -= 1
            if item.is_prefill:
                self._done_prefilling(req)
            if req.finished:
                continue
            try:
                if item.is_prefill:
                    self._cache_prefix(req, item.start + item.count)
                self._append_token(req, token, logprob, now)
            except Exception as exc:
                self.fail(req, exc)
        if self.spec is not None:
            settle_verified(self, batch, result, now)
        self.release_finished()

    def _done_prefilling(self, req: Request) -> None:
        key = hash(tuple(req.input_ids))
        left = self._prefilling.get(key, 0) - 1
        if left > 0:
            self._prefilling[key] = left
        else:
            self._prefilling.pop(key, None)

    def _append_token(self, req: Request, token: int, logprob: float, now: float) -> None:
        if req.first_token_time is None:
            req.first_token_time = now
        req.output_ids.append(token)
        req.output_logprobs.append(logprob)
        reason = self.stop_rules.check(req, token)
        if reason is not None:
            self.finish(req, reason)
        elif req.stream and req.sink is not None:
            self.emit(req, False)

    # -- KV ownership -----------------------------------------------------------------------
    def _evict(self, needed: int) -> None:
        """Unlocked radix leaves first, then unlocked reuse chunks (one allocator for both)."""
        needed -= self.cache.evict(needed)
        if needed > 0 and self.kvreuse is not None:
            self.kvreuse.evict(needed)

    def _alloc(self, count: int) -> torch.Tensor | None:
        if count > self.allocator.num_free:
            self._evict(count - self.allocator.num_free)
        if count > self.allocator.num_free:
            return None
        return self.allocator.alloc(count)

    def _attach(self, req: Request) -> None:
        """Gives a waiting request a table row and its cached prefix (locked)."""
        req.row = self.table.alloc()
        params = req.params
        self.table.set_row_params(
            req.row,
            (0.0 if params.greedy else params.temperature, params.top_p, params.min_p),
            (params.top_k, req.seed, len(req.input_ids)),
        )
        slots, node = self.cache.match_prefix(req.fill_ids[: req.prefix_match_limit])
        self.cache.lock(node)
        req.prefix_node = node
        req.prefix_len = req.num_computed = int(slots.numel())
        if slots.numel():
            self.table.write(req.row, 0, slots)
        if not req.matched_once:
            req.cached_tokens = req.prefix_len
            self.stats.cached_prompt_tokens += req.prefix_len
            self.stats.prompt_tokens += len(req.input_ids)
            req.matched_once = True
        else:
            req.cached_tokens += req.prefix_len

    def _cache_prefix(self, req: Request, length: int) -> None:
        """Moves the request's first `length` tokens' KV into the radix cache (so siblings reuse
        them) and re-locks at the new, deeper node."""
        if not self.cache.enabled or length <= req.prefix_len:
            return
        assert req.row is not None
        tokens = req.token_slice(0, length)
        mine = self.table.read(req.row, 0, length)
        self.cache.insert(tokens, mine)
        canonical, node = self.cache.match_prefix(tokens)
        duplicate = canonical != mine
        duplicate[: req.prefix_len] = False  # those were the tree's already
        if duplicate.any():
            self.allocator.free(mine[duplicate])
            self.table.write(req.row, 0, canonical)
        self.cache.lock(node)
        self.cache.unlock(req.prefix_node)
        req.prefix_node = node
        req.prefix_len = length

    def _detach(self, req: Request) -> None:
        """Releases the request's row; its computed KV goes to the prefix cache (or is freed)."""
        if req.row is None:
            return
        computed = min(req.num_computed, req.fill_len)
        if self.cache.enabled:
            self._cache_prefix(req, computed)
        else:
            self.allocator.free(self.table.read(req.row, req.prefix_len, computed))
        if req.num_computed > computed:
            # KV scheduled for tokens that were never sampled (a failed step): not cacheable.
            self.allocator.free(self.table.read(req.row, computed, req.num_computed))
        self.cache.unlock(req.prefix_node)
        req.prefix_node = None
        self.table.free(req.row)
        req.row = None
        req.prefix_len = req.num_computed = 0

    def _retract(self, req: Request) -> None:
        assert req.inflight == 0, "retraction needs a settled request"
        self._detach(req)
        req.retractions += 1
        self.running.pop(req.rid, None)
        req.status = RequestStatus.WAITING
        if req not in self.waiting:
            self.waiting.append(req)

    # -- finishing --------------------------------------------------------------------------
    def finish(self, req: Request, reason: dict[str, Any]) -> None:
        """Marks the request finished; `release_finished` hands it back to its caller."""
        if req.finished:
            return
        req.finish_reason = reason
        req.status = RequestStatus.FINISHED
        req.finish_time = time.perf_counter()
        self._finished.append(req)

    def fail(self, req: Request, exc: BaseException, code: int = 400) -> None:
        """Finishes one request with an error output (the step failed on it alone)."""
        self.stats.isolated_failures += 1
        req.error = {"message": f"the engine failed on this request: {exc}", "code": code}
        self.finish(req, {"type": "abort", "message": str(req.error["message"])})

    def release_finished(self) -> None:
        done, self._finished = self._finished, []
        for req in done:
            # A step still in flight may compute for it: its KV lands in slots the cache now owns
            # (stream order keeps every later reader behind it) and its token is discarded.
            self._detach(req)
            self.running.pop(req.rid, None)
            if req in self.waiting:
                self.waiting.remove(req)
            self.by_rid.pop(req.rid, None)
            self.emit(req, True)
            if self.spec is not None:
                self.spec.on_finished(req)
