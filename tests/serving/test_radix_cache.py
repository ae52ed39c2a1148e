from __future__ import annotations

import torch

from rollout_accel.serving.engine.kv_pool import SlotAllocator
from rollout_accel.serving.engine.radix_cache import RadixCache


def test_match_insert_split_evict() -> None:
    alloc = SlotAllocator(100)
    cache = RadixCache(alloc.free)
    a = alloc.alloc(6)
    existing, _ = cache.insert([1, 2, 3, 4, 5, 6], a)
    assert existing == 0
    slots, _ = cache.match_prefix([1, 2, 3, 9])
    assert torch.equal(slots, a[:3])
    assert cache.match_length([1, 2, 3, 4, 5, 6, 7]) == 6
    b = alloc.alloc(5)
    existing, node_b = cache.insert([1, 2, 3, 7, 8], b)
    assert existing == 3
    alloc.free(b[:3])  # the caller frees its duplicates
    cache.lock(node_b)
    free_before = alloc.num_free
    freed = cache.evict(100)
    # Only the unlocked branch [4, 5, 6] can go; [1, 2, 3] and [7, 8] are locked by node_b.
    assert freed == 3 and alloc.num_free == free_before + 3
    assert cache.match_length([1, 2, 3, 4]) == 3
    cache.unlock(node_b)
    assert cache.evict(100) == 5
    assert alloc.num_free == alloc.capacity
