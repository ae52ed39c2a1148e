"""One prompt's prefill over the paged pool with the radix cache and chunk reuse, end to end.

The walk the engine's prefill row takes with KV reuse on (and what the bench and the tests run):
  1. the radix cache gives the longest cached prefix (locked); the rest gets request slots;
  2. with segments and a re-rotatable model: `plan_reuse` finds stored chunks, `blend_prefill`
     writes the KV, the chunk locks are released (their KV was copied), the missed segments are
     stored; otherwise (no segments, reuse off, or a refused rope variant, counted) full prefill;
  3. `finish` hands the prompt's KV to the radix cache and unlocks the prefix.
Slot ownership stays exact throughout: free list, radix node, chunk, or this request.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rollout_accel.serving.engine.kv_pool import OutOfSlotsError, SlotAllocator
from rollout_accel.serving.engine.radix_cache import RadixCache, RadixNode
from rollout_accel.serving.kvreuse.blend import BlendResult, BlendSettings, blend_prefill
from rollout_accel.serving.kvreuse.chunk_store import ChunkStore
from rollout_accel.serving.kvreuse.plan import ReusePlan, plan_reuse, store_segments
from rollout_accel.serving.kvreuse.rerotate import rope_refusal
from rollout_accel.serving.kvreuse.segments import Segment
from rollout_accel.serving.models.decoder import CausalLM
from rollout_accel.serving.models.paged_kv import AttentionMetadata, PagedKVCache


@dataclass(slots=True)
class ReuseMetrics:
    """Counters over every prefill (what /v1/loads or meta_info reports)."""

    prompts: int = 0
    prompt_tokens: int = 0
    radix_cached_tokens: int = 0
    reused_tokens: int = 0
    recomputed_reused_tokens: int = 0
    new_tokens: int = 0
    computed_tokens: float = 0.0  # full-token units (token-layers / layers)
    stored_tokens: int = 0
    fallbacks: int = 0
    fallback_reasons: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "prompts": self.prompts,
            "prompt_tokens": self.prompt_tokens,
            "radix_cached_tokens": self.radix_cached_tokens,
            "reused_tokens": self.reused_tokens,
            "recomputed_reused_tokens": self.recomputed_reused_tokens,
            "new_tokens": self.new_tokens,
            "computed_tokens": self.computed_tokens,
            "stored_tokens": self.stored_tokens,
            "fallbacks": self.fallbacks,
            "fallback_reasons": dict(self.fallback_reasons),
        }


@dataclass(slots=True)
class PrefillOutcome:
    """A prefilled prompt: `slots[:prefix_len]` belong to the radix cache (locked through
    `prefix_node`), `slots[prefix_len:]` to this request until `finish`."""

    input_ids: list[int]
    slots: torch.Tensor
    prefix_len: int
    prefix_node: RadixNode
    logits: torch.Tensor  # [vocab] float32 at the last prompt position
    seconds: float
    computed_tokens: float
    blend: BlendResult | None = None
    plan: ReusePlan | None = None
    finished: bool = False


class ReusePrefiller:
    """Prefills prompts one at a time; `settings=None` or `store=None` means full prefill only
    (the radix cache still applies)."""

    def __init__(
        self,
        model: CausalLM,
        cache: PagedKVCache,
        allocator: SlotAllocator,
        radix: RadixCache,
        store: ChunkStore | None = None,
        settings: BlendSettings | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.allocator = allocator
        self.radix = radix
        self.store = store
        self.settings = settings
        self.refusal = rope_refusal(model)
        self.metrics = ReuseMetrics()
        self.device = cache.k[0].device

    @classmethod
    def create(
        cls,
        model: CausalLM,
        num_slots: int,
        settings: BlendSettings | None = None,
        min_tokens: int = 16,
        max_chunk_slots: int | None = None,
    ) -> ReusePrefiller:
        """A private pool (cache, allocator, radix cache, and a chunk store when `settings` is
        given) in the model's dtype and device, for benches and tests."""
        cfg = model.config
        param = next(model.parameters())
        cache = PagedKVCache(
            cfg.num_hidden_layers,
            num_slots,
            cfg.num_key_value_heads,
            cfg.head_dim,
            param.dtype,
            param.device,
        )
        allocator = SlotAllocator(num_slots)
        radix = RadixCache(allocator.free)
        store = (
            ChunkStore(allocator, cache, min_tokens=min_tokens, max_slots=max_chunk_slots)
            if settings is not None
            else None
        )
        return cls(model, cache, allocator, radix, store, settings)

    def alloc(self, count: int) -> torch.Tensor:
        """`count` free slots, evicting unlocked radix leaves, then unlocked chunks, if needed."""
        short = count - self.allocator.num_free
        if short > 0:
            short -= self.radix.evict(short)
        if short > 0 and self.store is not None:
            self.store.evict(short)
        if count > self.allocator.num_free:
            raise OutOfSlotsError(f"need {count} KV slots, {self.allocator.num_free} free")
        return self.allocator.alloc(count)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def prefill(self, input_ids: Sequence[int], segments: Sequence[Segment] = ()) -> PrefillOutcome:
        ids = list(input_ids)
        total = len(ids)
        self._sync()
        start = time.perf_counter()
        prefix, node = self.radix.match_prefix(ids)
        prefix_len = min(int(prefix.numel()), total - 1)  # the last token is always computed
        self.radix.lock(node)
        try:
            own = self.alloc(total - prefix_len)
        except OutOfSlotsError:
            self.radix.unlock(node)
            raise
        slots = torch.cat([prefix[:prefix_len], own])
        blend: BlendResult | None = None
        plan: ReusePlan | None = None
        use_reuse = bool(segments) and self.store is not None and self.settings is not None
        if use_reuse and self.refusal is not None:
            self.metrics.fallbacks += 1
            reasons = self.metrics.fallback_reasons
            reasons[self.refusal] = reasons.get(self.refusal, 0) + 1
            use_reuse = False
        if use_reuse:
            assert self.store is not None and self.settings is not None
            plan = plan_reuse(self.store, ids, segments, prefix_len)
            try:
                blend = blend_prefill(
                    self.model, self.cache, ids, slots, prefix_len, plan.spans, self.settings
                )
            finally:
                plan.release(self.store)
            logits, computed = blend.logits, blend.computed_tokens
            self.metrics.stored_tokens += store_segments(self.store, ids, slots, plan)
        else:
            logits = self._full_prefill(ids, slots, prefix_len)
            computed = float(total - prefix_len)
        self._sync()
        seconds = time.perf_counter() - start
        m = self.metrics
        m.prompts += 1
        m.prompt_tokens += total
        m.radix_cached_tokens += prefix_len
        m.computed_tokens += computed
        if blend is not None:
            m.reused_tokens += blend.reused_tokens
            m.recomputed_reused_tokens += blend.recomputed_reused
            m.new_tokens += blend.new_tokens
        else:
            m.new_tokens += total - prefix_len
        return PrefillOutcome(ids, slots, prefix_len, node, logits, seconds, computed, blend, plan)

    def _full_prefill(self, ids: list[int], slots: torch.Tensor, prefix_len: int) -> torch.Tensor:
        dev = self.device
        total = len(ids)
        n = total - prefix_len
        meta = AttentionMetadata(
            slot_mapping=slots[prefix_len:].to(dev),
            block_table=slots.to(dev, torch.int32)[None, :],
            seq_lens=torch.tensor([total], dtype=torch.int32, device=dev),
            cu_q_lens=torch.tensor([0, n], dtype=torch.int32, device=dev),
            page_size=1,
            is_decode=False,
            max_q_len=n,
        )
        logits = self.model.forward_paged(
            torch.tensor(ids[prefix_len:], device=dev),
            torch.arange(prefix_len, total, device=dev),
            meta,
            self.cache,
            logit_rows=torch.tensor([n - 1], device=dev),
            max_position=total - 1,
        )
        return logits[0]

    def finish(self, outcome: PrefillOutcome) -> None:
        """The prompt's KV goes to the radix cache (duplicates freed), the prefix is unlocked.
        Also the abort path: safe to call once after `prefill`, whatever happened since."""
        if outcome.finished:
            return
        own = outcome.slots[outcome.prefix_len :]
        if self.radix.enabled:
            already, _ = self.radix.insert(outcome.input_ids, outcome.slots)
            dup_end = max(already, outcome.prefix_len)
            self.allocator.free(outcome.slots[outcome.prefix_len : dup_end])
        else:
            self.allocator.free(own)
        self.radix.unlock(outcome.prefix_node)
        outcome.finished = True
