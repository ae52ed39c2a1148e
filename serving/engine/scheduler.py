"""Continuous batching: admits waiting requests under a token budget (chunked prefill), decodes
every running request, caches prefixes, preempts by recompute when KV slots run out, and applies
the finishing rules. Runs on the engine thread only; nothing here is thread-safe by design.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rollout_accel.serving.engine.kv_pool import OutOfSlotsError, RequestTable, SlotAllocator
from rollout_accel.serving.engine.model_runner import ForwardItem, ModelRunner
from rollout_accel.serving.engine.output import build_output
from rollout_accel.serving.engine.prefill_work import QueueClock
from rollout_accel.serving.engine.radix_cache import RadixCache
from rollout_accel.serving.engine.request import Request, RequestStatus
from rollout_accel.serving.engine.schedule_policy import WaitingQueuePolicy
from rollout_accel.serving.models.tokenizer import TextTokenizer


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


class Scheduler:
    """Owns every live request, the slot allocator, the radix cache and the runner."""

    def __init__(
        self,
        runner: ModelRunner,
        allocator: SlotAllocator,
        table: RequestTable,
        cache: RadixCache,
        policy: WaitingQueuePolicy,
        tokenizer: TextTokenizer,
        limits: SchedulerLimits,
        eos_ids: tuple[int, ...],
        weight_version: Callable[[], str],
        overlap: bool = True,
    ) -> None:
        self.runner = runner
        self.allocator = allocator
        self.table = table
        self.cache = cache
        self.policy = policy
        self.tokenizer = tokenizer
        self.limits = limits
        self.eos_ids = frozenset(eos_ids)
        self.weight_version = weight_version
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.by_rid: dict[str, Request] = {}
        self.stats = SchedulerStats()
        self.overlap = overlap
        self._pending: Any = None

    # -- queue management -------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.by_rid[req.rid] = req
        self.waiting.append(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._pending is not None)

    def abort(self, rid: str) -> bool:
        req = self.by_rid.get(rid)
        if req is None:
            return False
        self._finish(req, {"type": "abort", "message": "Abort request."})
        self._release_finished()
        return True

    def abort_all(self) -> int:
        reqs = list(self.by_rid.values())
        for req in reqs:
            self._finish(req, {"type": "abort", "message": "Abort all requests."})
        self._release_finished()
        return len(reqs)

    def retract_all(self) -> int:
        """Pause mode `retract`: running requests give back their KV (kept in the prefix cache)
        and wait; they resume by recompute."""
        moved = list(self.running)
        for req in moved:
            self._retract(req)
        return len(moved)

    def flush_cache(self) -> bool:
        """Empties the prefix cache; refused (False) while any request holds KV."""
        if self.running or any(r.row is not None for r in self.waiting):
            return False
        self.cache.flush()
        return True

    def loads(self) -> dict[str, int]:
        return {
            "num_running_reqs": len(self.running),
            "num_waiting_reqs": len(self.waiting),
            "num_used_tokens": self.allocator.capacity - self.allocator.num_free,
            "num_cached_tokens": self.cache.cached_slots,
            "max_total_num_tokens": self.allocator.capacity,
        }

    # -- one step ---------------------------------------------------------------------------
    @property
    def overlapping(self) -> bool:
        """A decode step is queued on the GPU and its results are not processed yet."""
        return self._pending is not None

    def drain(self) -> None:
        """Processes the queued decode step, if any (before commands change the state)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._finish_pending(pending)

    def _finish_pending(self, pending: Any) -> None:
        tokens, logprobs = pending.wait()
        for item, token, logprob in zip(pending.items, tokens, logprobs, strict=True):
            req = item.request
            if req.finished or req.row is None:
                # It finished at the step before; this token was computed ahead for nothing.
                self.allocator.free(item.slots)
                continue
            req.num_computed = item.start + 1
            self.stats.decode_tokens += 1
            self._append_token(req, token, logprob)
        self._release_finished()

    def _step_overlapped(self) -> bool:
        """Steady-state decode with the CPU one step ahead: queue step N+1 (its input tokens are
        step N's samples, still on the GPU) before waiting for step N, so finishing checks and
        scheduling overlap the GPU's work. A request that finishes at N wastes one token of N+1."""
        pending = self._pending
        assert pending is not None
        following = None
        if not self.waiting:
            live = [
                (index, item)
                for index, item in enumerate(pending.items)
                if not item.request.finished
                and len(item.request.output_ids) + 1 < item.request.params.max_new_tokens
            ]
            slots = self._alloc(len(live)) if live else None
            if slots is not None:
                items = [
                    ForwardItem(item.request, item.start + 1, 1, slots[i : i + 1], is_prefill=False)
                    for i, (_, item) in enumerate(live)
                ]
                if self.runner.can_overlap(items):
                    pending.index_map = (
                        None if len(live) == len(pending.items) else [index for index, _ in live]
                    )
                    following = self.runner.launch(items, prev=pending)
                    self.stats.steps += 1
                else:
                    self.allocator.free(slots)
        self._pending = None
        self._finish_pending(pending)
        self._pending = following
        return True

    def step(self) -> bool:
        """Runs one forward: every decoding request advances one token, and waiting requests are
        prefilled (in chunks) in the same batch up to the token budget. Returns False when there
        was nothing to do."""
        if self._pending is not None:
            return self._step_overlapped()
        decode_items = self._schedule_decode()
        prefill_items = self._schedule_prefill()
        items = decode_items + prefill_items
        if not items:
            return False
        if (
            self.overlap
            and not prefill_items
            and hasattr(self.runner, "launch")
            and self.runner.can_overlap(decode_items)
        ):
            self._pending = self.runner.launch(decode_items)
            self.stats.steps += 1
            return True
        result = self.runner.forward(items, num_decode=len(decode_items))
        self.stats.steps += 1
        sampled = 0
        for index, item in enumerate(items):
            req = item.request
            req.num_computed = item.start + item.count
            if index in result.input_logprobs:
                if not req.input_logprobs:
                    req.input_logprobs.append(None)  # the first prompt token has no logprob
                req.input_logprobs.extend(result.input_logprobs[index])
            if item.is_prefill:
                self.stats.prefill_tokens += item.count
            else:
                self.stats.decode_tokens += 1
            if not item.samples:
                continue
            token, logprob = result.tokens[sampled], result.logprobs[sampled]
            sampled += 1
            if req.finished:  # aborted by a sink callback during this step
                continue
            if item.is_prefill:
                self._cache_unfinished(req)
                if req in self.waiting:
                    self.waiting.remove(req)
                    self.running.append(req)
                    req.status = RequestStatus.RUNNING
            self._append_token(req, token, logprob)
        self._release_finished()
        return True

    # -- scheduling -------------------------------------------------------------------------
    def _schedule_prefill(self) -> list[ForwardItem]:
        if not self.waiting:
            return []
        budget = self.limits.max_prefill_tokens
        items: list[ForwardItem] = []
        in_batch: set[int] = set()
        active = len(self.running)
        clock = QueueClock.current(self.stats.prefill_tokens)
        for req in self.policy.order(self.waiting, self.cache, clock):
            if budget <= 0:
                break
            if req.row is None:
                if active >= self.limits.max_running_requests or self.table.num_free == 0:
                    continue
                key = hash(tuple(req.input_ids))
                if key in in_batch:
                    # An identical prompt is being computed in this batch: wait one step and
                    # take it from the prefix cache instead of computing it twice.
                    continue
                self._attach(req)
                in_batch.add(key)
            active += 1
            count = min(req.remaining_prefill(), budget)
            slots = self._alloc(count)
            if slots is None:
                if not items and not self.running:
                    count = min(count, self.allocator.num_free)
                    slots = self._alloc(count) if count > 0 else None
                if slots is None:
                    break
            items.append(ForwardItem(req, req.num_computed, count, slots))
            budget -= count
        return items

    def _attach(self, req: Request) -> None:
        """Gives a waiting request a table row and its cached prefix (locked)."""
        req.row = self.table.alloc()
        slots, node = self.cache.match_prefix(req.fill_ids[:-1])
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

    def _schedule_decode(self) -> list[ForwardItem]:
        reqs = [r for r in self.running if r.in_decode]
        while reqs:
            slots = self._alloc(len(reqs))
            if slots is not None:
                return [
                    ForwardItem(r, r.num_computed, 1, slots[i : i + 1], is_prefill=False)
                    for i, r in enumerate(reqs)
                ]
            if len(reqs) == 1:
                raise OutOfSlotsError(
                    "max_total_tokens: the KV cache cannot hold even one running request"
                )
            victim = max(reqs, key=lambda r: r.arrival_time)
            self._retract(victim)
            self.stats.retractions += 1
            reqs.remove(victim)
        return []

    def _alloc(self, count: int) -> torch.Tensor | None:
        if count > self.allocator.num_free:
            self.cache.evict(count - self.allocator.num_free)
        if count > self.allocator.num_free:
            return None
        return self.allocator.alloc(count)

    # -- KV ownership -----------------------------------------------------------------------
    def _own_slots(self, req: Request) -> torch.Tensor:
        assert req.row is not None
        return self.table.read(req.row, req.prefix_len, req.num_computed)

    def _cache_unfinished(self, req: Request) -> None:
        """Moves the request's computed tokens into the radix cache (so siblings reuse them) and
        re-locks at the new, deeper node."""
        if not self.cache.enabled:
            return
        assert req.row is not None
        tokens = req.fill_ids[: req.num_computed]
        mine = self.table.read(req.row, 0, req.num_computed)
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
        req.prefix_len = req.num_computed

    def _detach(self, req: Request) -> None:
        """Releases the request's row; its computed KV goes to the prefix cache (or is freed)."""
        if req.row is None:
            return
        if self.cache.enabled:
            self._cache_unfinished(req)
        else:
            self.allocator.free(self._own_slots(req))
        self.cache.unlock(req.prefix_node)
        req.prefix_node = None
        self.table.free(req.row)
        req.row = None
        req.prefix_len = req.num_computed = 0

    def _retract(self, req: Request) -> None:
        self._detach(req)
        req.retractions += 1
        if req in self.running:
            self.running.remove(req)
        req.status = RequestStatus.WAITING
        if req not in self.waiting:
            self.waiting.append(req)

    # -- finishing --------------------------------------------------------------------------
    def _append_token(self, req: Request, token: int, logprob: float) -> None:
        now = time.perf_counter()
        if req.first_token_time is None:
            req.first_token_time = now
        req.output_ids.append(token)
        req.output_logprobs.append(logprob)
        params = req.params
        reason: dict[str, Any] | None = None
        is_stop_token = token in params.stop_token_ids or (
            not params.ignore_eos and token in self.eos_ids
        )
        if is_stop_token and len(req.output_ids) >= params.min_new_tokens:
            reason = {"type": "stop", "matched": token}
        if reason is None and params.stop and len(req.output_ids) >= params.min_new_tokens:
            matched = self._match_stop_string(req)
            if matched is not None:
                reason = {"type": "stop", "matched": matched}
        if reason is None and len(req.output_ids) >= params.max_new_tokens:
            reason = {"type": "length", "length": params.max_new_tokens}
        if reason is None and req.fill_len >= self.limits.context_length:
            reason = {"type": "length", "length": len(req.output_ids)}
        if reason is not None:
            self._finish(req, reason)
        elif req.stream and req.sink is not None:
            req.sink(build_output(req, self.tokenizer, self.weight_version()), False)

    def _match_stop_string(self, req: Request) -> str | None:
        longest = max(len(s) for s in req.params.stop)
        # Tokens are at least one byte, so the last `longest + 2` tokens cover any stop string
        # that ends in the newest token (the +2 absorbs multi-byte characters split over tokens).
        tail = self.tokenizer.decode(req.output_ids[-(longest + 2) :], skip_special_tokens=False)
        for stop in req.params.stop:
            if stop in tail:
                return stop
        return None

    def _finish(self, req: Request, reason: dict[str, Any]) -> None:
        if req.finished:
            return
        req.finish_reason = reason
        req.status = RequestStatus.FINISHED
        req.finish_time = time.perf_counter()
        req.weight_version = self.weight_version()

    def _release_finished(self) -> None:
        done = [r for r in self.by_rid.values() if r.finished]
        for req in done:
            self._detach(req)
            if req in self.running:
                self.running.remove(req)
            if req in self.waiting:
                self.waiting.remove(req)
            del self.by_rid[req.rid]
            if req.sink is not None:
                req.sink(build_output(req, self.tokenizer, req.weight_version), True)
