"""KV reuse inside the engine step: the hook the scheduler and the runner call.

The engine step stays `schedule()` -> `launch(batch)` -> `process(handle)`; KV reuse changes
only how one prefill row's KV is assembled:
  * `schedule` (scheduler side): a waiting request that carries segments (the `segments` field,
    or the engine's separator) and has computed nothing of its own yet gets a batch of its own:
    its radix prefix is matched and locked as for any request, and the rest of its sequence is
    one item (not chunked: selection is over the whole prompt). Fair to decodes: after a reuse
    step with decodes waiting, the next step is a normal one.
  * `forward` (runner side): for such a batch, the chunk store is searched (hits locked), the KV
    is written by `blend_prefill` (re-rotated chunks + selective recompute), the locks are
    released, missed segments are stored; the logits of the last position go to the sampler like
    any prefill row's.
  * the chunk store takes its slots from the engine's allocator; `evict` lets the scheduler
    reclaim unlocked chunks when slots run short (after the radix cache's leaves).
Requests with prompt logprobs, and models whose rotary cannot be re-rotated, take the normal path
(the latter counted as fallbacks). Runs on the engine thread only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from rollout_accel.serving.engine.batch import Batch, ForwardItem
from rollout_accel.serving.engine.kv_pool import RequestTable, SlotAllocator
from rollout_accel.serving.engine.request import Request
from rollout_accel.serving.kvreuse.blend import BlendSettings, blend_prefill
from rollout_accel.serving.kvreuse.chunk_store import ChunkStore
from rollout_accel.serving.kvreuse.plan import plan_reuse, store_segments
from rollout_accel.serving.kvreuse.prefiller import ReuseMetrics
from rollout_accel.serving.kvreuse.rerotate import rope_refusal
from rollout_accel.serving.kvreuse.segments import split_on_separator
from rollout_accel.serving.models.decoder import CausalLM
from rollout_accel.serving.models.paged_kv import PagedKVCache

if TYPE_CHECKING:
    from rollout_accel.serving.engine.scheduler import Scheduler


class KVReuse:
    """Chunk store + selective-recompute prefill, plugged into one engine."""

    def __init__(
        self,
        model: CausalLM,
        kv_cache: PagedKVCache,
        allocator: SlotAllocator,
        table: RequestTable,
        settings: BlendSettings,
        min_chunk_tokens: int = 16,
        max_chunk_slots: int | None = None,
        separator: Sequence[int] = (),
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.table = table
        self.settings = settings
        self.store = ChunkStore(allocator, kv_cache, min_chunk_tokens, max_chunk_slots)
        self.refusal = rope_refusal(model)
        self.separator = list(separator)
        self.metrics = ReuseMetrics()
        self._last_was_reuse = False
        self._gave_up: set[str] = set()  # rids left to the normal path (counted once)

    # -- which requests ---------------------------------------------------------------------
    def segments_of(self, req: Request) -> list[tuple[int, int]]:
        if req.segments:
            return req.segments
        if self.separator:
            return split_on_separator(req.input_ids, self.separator)
        return []

    def claims(self, req: Request) -> bool:
        """Whether this request's prefill goes through reuse (the normal path skips it)."""
        if req.rid in self._gave_up or req.logprob_start_len >= 0:
            return False
        if req.row is not None and req.num_computed != req.prefix_len:
            return False  # part of it was computed the normal way (e.g. a chunk)
        if not self.segments_of(req):
            return False
        if self.refusal is not None:
            self._give_up(req, self.refusal)
            return False
        return True

    def _give_up(self, req: Request, reason: str) -> None:
        self._gave_up.add(req.rid)
        self.metrics.fallbacks += 1
        reasons = self.metrics.fallback_reasons
        reasons[reason] = reasons.get(reason, 0) + 1

    # -- scheduler side ---------------------------------------------------------------------
    def schedule(self, scheduler: Scheduler, in_flight: bool) -> Batch | None:
        """A one-item batch prefilling the first claimable waiting request, or None."""
        has_decode = any(r.decode_ready for r in scheduler.running.values())
        if self._last_was_reuse and has_decode:
            self._last_was_reuse = False
            return None
        self._gave_up &= set(scheduler.by_rid)
        for req in scheduler.policy.order(scheduler.waiting, scheduler.cache):
            if not self.claims(req):
                continue
            if req.row is None:
                if (
                    len(scheduler.running) >= scheduler.limits.max_running_requests
                    or scheduler.table.num_free == 0
                ):
                    return None
                if hash(tuple(req.input_ids)) in scheduler._prefilling:
                    continue  # an identical prompt is in flight: take it from the radix cache
                scheduler._attach(req)
            count = req.remaining_prefill()
            slots = scheduler._alloc(count)
            if slots is None:
                self._give_up(req, "no KV slots for a whole-prompt prefill")
                continue
            self._last_was_reuse = True
            item = ForwardItem(req, req.num_computed, count, True, True)
            return Batch([item], slots, 0)
        self._last_was_reuse = False
        return None

    def evict(self, needed: int) -> int:
        return self.store.evict(needed)

    def flush(self) -> bool:
        return self.store.flush()

    def loads(self) -> dict[str, Any]:
        return {**self.metrics.as_dict(), "chunk_tokens": self.store.cached_slots}

    # -- runner side ------------------------------------------------------------------------
    def handles(self, batch: Batch) -> bool:
        if len(batch.items) != 1:
            return False
        item = batch.items[0]
        req = item.request
        return (
            item.is_prefill
            and item.emits_token
            and not item.wants_input_logprobs
            and item.start + item.count == req.fill_len
            and self.refusal is None
            and req.rid not in self._gave_up
            and bool(self.segments_of(req))
        )

    @torch.inference_mode()
    def forward(
        self, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[int, list[float]]]:
        """The batch's one item prefilled by blend; returns what the runner's eager forward
        returns: logits [1, vocab], device row and next position, no prompt logprobs."""
        item = batch.items[0]
        req = item.request
        assert req.row is not None
        dev = self.kv_cache.k[0].device
        end = item.start + item.count
        ids = req.token_slice(0, end)
        slots = self.table.read(req.row, 0, end)
        self.table.req_to_token[req.row, item.start : end] = batch.slots.to(dev, torch.int32)
        segments = [(s, e) for s, e in self.segments_of(req) if e <= end]
        plan = plan_reuse(self.store, ids, segments, item.start)
        try:
            result = blend_prefill(
                self.model, self.kv_cache, ids, slots, item.start, plan.spans, self.settings
            )
        except Exception as exc:
            # The engine rolls the step back and retries the request alone: by the normal path.
            self._give_up(req, f"reuse prefill failed ({type(exc).__name__})")
            raise
        finally:
            plan.release(self.store)
        stored = store_segments(self.store, ids, slots, plan)
        m = self.metrics
        m.prompts += 1
        m.prompt_tokens += end
        m.radix_cached_tokens += item.start
        m.reused_tokens += result.reused_tokens
        m.recomputed_reused_tokens += result.recomputed_reused
        m.new_tokens += result.new_tokens
        m.computed_tokens += result.computed_tokens
        m.stored_tokens += stored
        req.reuse_info = {
            "reused_tokens": result.reused_tokens,
            "recomputed_reused_tokens": result.recomputed_reused,
            "new_tokens": result.new_tokens,
            "computed_tokens": round(result.computed_tokens, 2),
        }
        rows = torch.tensor([req.row], dtype=torch.int64, device=dev)
        nxt = torch.tensor([end], dtype=torch.int64, device=dev)
        return result.logits[None, :], rows, nxt, {}
