"""Chunk store: content lookup, locks, LRU eviction, and exact slot ownership (free list, radix
node, chunk, request) under eviction pressure and aborts."""

from __future__ import annotations

import random

import pytest
import torch

from rollout_accel.serving.engine.kv_pool import OutOfSlotsError, SlotAllocator
from rollout_accel.serving.kvreuse.blend import BlendSettings
from rollout_accel.serving.kvreuse.chunk_store import ChunkStore, chunk_key
from rollout_accel.serving.kvreuse.plan import plan_reuse
from rollout_accel.serving.models.paged_kv import PagedKVCache
from tests.serving.kvreuse_helpers import audit_slots, make_prefiller, tiny_model


def _store(num_slots: int = 64, **kw) -> tuple[ChunkStore, SlotAllocator, PagedKVCache]:
    alloc = SlotAllocator(num_slots)
    cache = PagedKVCache(2, num_slots, 1, 4, torch.float32, "cpu")
    for layer in range(2):
        cache.k[layer].copy_(torch.randn(cache.k[layer].shape))
        cache.v[layer].copy_(torch.randn(cache.v[layer].shape))
    return ChunkStore(alloc, cache, min_tokens=4, **kw), alloc, cache


def test_store_copies_kv_and_looks_up_by_content() -> None:
    store, alloc, cache = _store()
    req = alloc.alloc(10)
    tokens = list(range(100, 110))
    chunk = store.store(tokens, req, position=7)
    assert chunk is not None and chunk.position == 7 and len(chunk) == 10
    assert not set(chunk.slots.tolist()) & set(req.tolist())
    for layer in range(2):
        assert torch.equal(cache.k[layer][chunk.slots], cache.k[layer][req])
        assert torch.equal(cache.v[layer][chunk.slots], cache.v[layer][req])
    assert store.lookup(tokens) is chunk and chunk.hits == 1
    assert store.lookup(tokens[:-1]) is None and store.lookup(tokens[::-1]) is None
    assert store.store(tokens, req, position=0) is chunk  # stored once
    assert store.lookup([1, 2, 3]) is None  # shorter than min_tokens: never stored
    assert chunk_key(tokens) != chunk_key(tokens[::-1])
    assert alloc.num_free == 63 - 20


def test_lru_eviction_skips_locked_chunks_and_respects_max_slots() -> None:
    store, alloc, _ = _store(num_slots=41, max_slots=30)
    src = alloc.alloc(10)
    a = store.store(list(range(10)), src, 0)
    b = store.store(list(range(10, 20)), src, 0)
    assert store.store(list(range(20, 30)), src, 0) is not None
    assert store.cached_slots == 30
    store.lookup(list(range(10)))  # a is now the most recent
    store.lock(b)
    d = store.store(list(range(30, 40)), src, 0)  # over max_slots: evicts c (LRU, unlocked)
    assert d is not None and list(range(20, 30)) not in store
    assert list(range(10)) in store and list(range(10, 20)) in store
    store.lock(a)
    store.lock(d)
    assert store.store(list(range(40, 50)), src, 0) is None  # everything else locked
    assert store.stats.skipped_no_space == 1
    assert not store.flush()  # locked chunks refuse a flush
    for chunk in (a, b, d):
        store.unlock(chunk)
    with pytest.raises(AssertionError):
        store.unlock(a)
    assert store.flush() and store.cached_slots == 0
    alloc.free(src)
    assert alloc.num_free == 40


def test_accounting_exact_under_eviction_and_abort() -> None:
    """A small pool, many prompts sharing documents: radix leaves and chunks are evicted to make
    room, some requests abort after planning (locks released, slots freed) — after every step
    each slot has exactly one owner, and at the end everything drains back to the free list."""
    model = tiny_model()
    pf = make_prefiller(
        model, num_slots=700, settings=BlendSettings(recompute_ratio=0.2), min_tokens=8
    )
    rng = random.Random(0)
    docs = [[rng.randrange(3, 500) for _ in range(rng.randrange(20, 60))] for _ in range(8)]
    for step in range(24):
        head = [rng.randrange(3, 500) for _ in range(rng.randrange(3, 12))]
        ids, segs = list(head), []
        for doc in rng.sample(docs, 3):
            segs.append((len(ids), len(ids) + len(doc)))
            ids += doc
        ids += [rng.randrange(3, 500) for _ in range(4)]
        if step % 5 == 4:
            # abort after planning: the plan locked chunks and the request took slots
            _, node = pf.radix.match_prefix(ids)
            pf.radix.lock(node)
            plan = plan_reuse(pf.store, ids, segs, 0)
            taken = pf.alloc(len(ids))
            audit_slots(pf, [taken])
            assert all(c.lock_ref > 0 for c in plan.locked)
            plan.release(pf.store)
            plan.release(pf.store)  # idempotent
            pf.radix.unlock(node)
            pf.allocator.free(taken)
            assert all(c.lock_ref == 0 for c in pf.store.chunks.values())
            audit_slots(pf)
            continue
        out = pf.prefill(ids, segs)
        audit_slots(pf, [out.slots[out.prefix_len :]])
        if step % 7 == 3:  # a request dropped mid-way still goes through finish exactly once
            pf.finish(out)
            pf.finish(out)
        else:
            pf.finish(out)
        audit_slots(pf)
    assert pf.store.stats.evicted > 0 and pf.metrics.reused_tokens > 0
    pf.radix.evict(10**6)
    assert pf.store.flush()
    assert pf.allocator.num_free == pf.allocator.capacity
    with pytest.raises(OutOfSlotsError):
        pf.alloc(pf.allocator.capacity + 1)
