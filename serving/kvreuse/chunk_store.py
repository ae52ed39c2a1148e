"""Chunk KV store: the KV of a token chunk, found by the chunk's content wherever it appears.

A radix cache only shares prefixes; agents re-read the same documents and each other's outputs at
other positions. A chunk's KV (every layer) is kept in its own slots of the engine's paged pool,
keyed by a hash of its token ids (the ids are compared too, so a collision is a miss). K stays as
the model wrote it (after rotary at the chunk's original positions `position + i`); a user moves
it to new positions with `kvreuse.rerotate`. V is position-free.

Ownership (the same rule as the radix cache, so one allocator serves all three): every slot of
the pool is owned by exactly one of the allocator's free list, one radix node, one chunk, or one
request. A chunk never shares slots: `store` copies the request's KV into fresh slots, and users
copy out of the chunk into their own slots. Chunks in use are locked (`lock_ref > 0`) and never
evicted; unlocked chunks are evicted least-recently-used first.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rollout_accel.serving.engine.kv_pool import OutOfSlotsError, SlotAllocator
from rollout_accel.serving.models.paged_kv import PagedKVCache

_clock = itertools.count()


def chunk_key(tokens: Sequence[int]) -> bytes:
    """Content key of a token chunk (blake2b of the ids as int64)."""
    data = torch.as_tensor(list(tokens), dtype=torch.int64).numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass(eq=False, slots=True)
class Chunk:
    """One stored chunk: `slots[i]` holds the KV of `tokens[i]`, rotated at `position + i`."""

    key: bytes
    tokens: tuple[int, ...]
    slots: torch.Tensor  # int64 on the host, len == len(tokens)
    position: int
    lock_ref: int = 0
    last_access: int = field(default_factory=lambda: next(_clock))
    hits: int = 0

    def __len__(self) -> int:
        return len(self.tokens)

    def positions(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Original positions of tokens [start, end)."""
        end = len(self.tokens) if end is None else end
        return torch.arange(self.position + start, self.position + end, dtype=torch.int64)


@dataclass(slots=True)
class ChunkStoreStats:
    lookups: int = 0
    hits: int = 0
    hit_tokens: int = 0
    stored: int = 0
    stored_tokens: int = 0
    evicted: int = 0
    evicted_tokens: int = 0
    skipped_no_space: int = 0


def copy_kv(cache: PagedKVCache, src: torch.Tensor, dst: torch.Tensor, layers: range) -> None:
    """K and V of slots `src` into slots `dst` for `layers` (no re-rotation)."""
    dev = cache.k[0].device
    s, d = src.to(dev), dst.to(dev)
    for layer in layers:
        cache.k[layer][d] = cache.k[layer][s]
        cache.v[layer][d] = cache.v[layer][s]


class ChunkStore:
    """Content-addressed chunk KV in the engine's paged pool, with lock refs and LRU eviction.

    `max_slots` caps the store's share of the pool (None: no cap besides the pool); chunks shorter
    than `min_tokens` are not stored (copying them costs more than it saves).
    """

    def __init__(
        self,
        allocator: SlotAllocator,
        cache: PagedKVCache,
        min_tokens: int = 16,
        max_slots: int | None = None,
        enabled: bool = True,
    ) -> None:
        if min_tokens < 1:
            raise ValueError(f"min_tokens: expected >= 1, got {min_tokens}")
        self.allocator = allocator
        self.cache = cache
        self.min_tokens = min_tokens
        self.max_slots = max_slots
        self.enabled = enabled
        self.chunks: dict[bytes, Chunk] = {}
        self.cached_slots = 0
        self.stats = ChunkStoreStats()

    # -- lookup -----------------------------------------------------------------------------
    def lookup(self, tokens: Sequence[int]) -> Chunk | None:
        """The stored chunk holding exactly `tokens`, marked recently used; None on a miss."""
        if not self.enabled or len(tokens) < self.min_tokens:
            return None
        self.stats.lookups += 1
        chunk = self.chunks.get(chunk_key(tokens))
        if chunk is None or chunk.tokens != tuple(tokens):
            return None
        chunk.last_access = next(_clock)
        chunk.hits += 1
        self.stats.hits += 1
        self.stats.hit_tokens += len(chunk)
        return chunk

    def __contains__(self, tokens: Sequence[int]) -> bool:
        chunk = self.chunks.get(chunk_key(tokens))
        return chunk is not None and chunk.tokens == tuple(tokens)

    # -- locking ----------------------------------------------------------------------------
    def lock(self, chunk: Chunk) -> None:
        chunk.lock_ref += 1

    def unlock(self, chunk: Chunk) -> None:
        assert chunk.lock_ref > 0, "chunk unlocked more often than locked"
        chunk.lock_ref -= 1

    # -- insert -----------------------------------------------------------------------------
    def store(self, tokens: Sequence[int], src_slots: torch.Tensor, position: int) -> Chunk | None:
        """Copies the KV of `tokens` (in `src_slots`, rotated at `position + i`) into fresh
        slots owned by the store. Returns the chunk (the existing one if already stored), or None
        when disabled, too short, or no slots could be had without evicting locked chunks."""
        n = len(tokens)
        if not self.enabled or n < self.min_tokens:
            return None
        if src_slots.numel() != n:
            raise ValueError(f"src_slots: {src_slots.numel()} slots for {n} tokens")
        key = chunk_key(tokens)
        existing = self.chunks.get(key)
        if existing is not None and existing.tokens == tuple(tokens):
            existing.last_access = next(_clock)
            return existing
        if existing is not None:  # hash collision: the newer content wins if evictable
            if existing.lock_ref:
                return None
            self._drop(existing)
        if self.max_slots is not None:
            if n > self.max_slots:
                self.stats.skipped_no_space += 1
                return None
            over = self.cached_slots + n - self.max_slots
            if over > 0 and self.evict(over) < over:
                self.stats.skipped_no_space += 1
                return None
        if self.allocator.num_free < n:
            self.evict(n - self.allocator.num_free)
        try:
            slots = self.allocator.alloc(n)
        except OutOfSlotsError:
            self.stats.skipped_no_space += 1
            return None
        copy_kv(self.cache, src_slots, slots, range(len(self.cache.k)))
        chunk = Chunk(key, tuple(tokens), slots, position)
        self.chunks[key] = chunk
        self.cached_slots += n
        self.stats.stored += 1
        self.stats.stored_tokens += n
        return chunk

    # -- eviction ---------------------------------------------------------------------------
    def evictable_slots(self) -> int:
        return sum(len(c) for c in self.chunks.values() if c.lock_ref == 0)

    def evict(self, needed: int) -> int:
        """Frees at least `needed` slots from unlocked chunks, LRU first, if that many exist."""
        freed = 0
        if needed <= 0:
            return 0
        for chunk in sorted(self.chunks.values(), key=lambda c: c.last_access):
            if freed >= needed:
                break
            if chunk.lock_ref == 0:
                freed += len(chunk)
                self._drop(chunk)
        return freed

    def _drop(self, chunk: Chunk) -> None:
        del self.chunks[chunk.key]
        self.allocator.free(chunk.slots)
        self.cached_slots -= len(chunk)
        self.stats.evicted += 1
        self.stats.evicted_tokens += len(chunk)

    def flush(self) -> bool:
        """Drops every chunk; refused (False) while any chunk is locked."""
        if any(c.lock_ref for c in self.chunks.values()):
            return False
        for chunk in list(self.chunks.values()):
            self._drop(chunk)
        return True

    def owned_slots(self) -> torch.Tensor:
        """Every slot the store owns (for accounting checks)."""
        parts = [c.slots for c in self.chunks.values()]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
