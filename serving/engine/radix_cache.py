"""Radix tree from token-id prefixes to the KV slots that hold them (prefix caching).

The n samples of a GRPO group share their prompt: the first sample's prefill inserts the prompt,
the others match it and compute only what differs. Nodes in use are locked (lock_ref > 0) and
never evicted; unlocked leaves are evicted least-recently-used first when slots run out.
Invariant: every slot is owned by exactly one of: the free list, one tree node, one request.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable

import torch


class RadixNode:
    __slots__ = ("children", "key", "last_access", "lock_ref", "parent", "value")
    _ids = itertools.count()

    def __init__(self, key: list[int], value: torch.Tensor, parent: RadixNode | None) -> None:
        self.key = key
        self.value = value  # slots, int64, len == len(key)
        self.parent = parent
        self.children: dict[int, RadixNode] = {}
        self.lock_ref = 0
        self.last_access = time.monotonic()

    def __lt__(self, other: RadixNode) -> bool:
        return self.last_access < other.last_access


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def common_prefix_len(a: list[int], b: list[int], start: int = 0) -> int:
    """Length of the common prefix of `a` and `b`, given that they agree before `start`.

    Compares list slices (C speed) and bisects to the first mismatch, so scheduling policies can
    compare thousands of tokens per waiting request every step at little cost."""
    n = min(len(a), len(b))
    lo = min(start, n)
    if a[lo:n] == b[lo:n]:
        return n
    hi = n  # invariant: a[:lo] == b[:lo], and the first mismatch is in [lo, hi)
    while hi - lo > 16:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    while lo < hi and a[lo] == b[lo]:
        lo += 1
    return lo


class RadixCache:
    """Prefix tree over token ids; values are KV slot indices."""

    def __init__(self, free_slots: Callable[[torch.Tensor], None], enabled: bool = True) -> None:
        self._free_slots = free_slots
        self.enabled = enabled
        self.reset()

    def reset(self) -> None:
        self.root = RadixNode([], torch.empty(0, dtype=torch.int64), None)
        self.root.lock_ref = 1  # the root is never evicted
        self.cached_slots = 0

    # -- lookup -----------------------------------------------------------------------------
    def match_prefix(self, tokens: list[int]) -> tuple[torch.Tensor, RadixNode]:
        """Longest cached prefix of `tokens`: its slots and the deepest node (split to fit)."""
        node = self.root
        parts: list[torch.Tensor] = []
        if not self.enabled:
            return torch.empty(0, dtype=torch.int64), node
        pos = 0
        now = time.monotonic()
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            shared = _common_prefix(child.key, tokens[pos:])
            if shared < len(child.key):
                child = self._split(child, shared)
            child.last_access = now
            parts.append(child.value)
            node = child
            pos += shared
        slots = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
        return slots, node

    def match_length(self, tokens: list[int]) -> int:
        """How many leading tokens are cached; read-only (no split, no access-time update)."""
        if not self.enabled:
            return 0
        node, pos = self.root, 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            shared = _common_prefix(child.key, tokens[pos:])
            pos += shared
            if shared < len(child.key):
                break
            node = child
        return pos

    def peek(self, tokens: list[int]) -> int:
        """How many leading tokens are cached, for schedulers scoring waiting requests every step:
        no lock, no split, no access-time update (so a look that admits nothing changes no LRU
        order), node keys compared as slices."""
        if not self.enabled:
            return 0
        node, pos, total = self.root, 0, len(tokens)
        while pos < total:
            child = node.children.get(tokens[pos])
            if child is None:
                break
            key = child.key
            end = pos + len(key)
            if end <= total and tokens[pos:end] == key:
                pos, node = end, child
                continue
            return pos + common_prefix_len(key, tokens[pos:end])
        return pos

    def _split(self, node: RadixNode, at: int) -> RadixNode:
        """Splits `node` so its first `at` tokens become a new parent; returns that parent."""
        parent = node.parent
        assert parent is not None
        head = RadixNode(node.key[:at], node.value[:at], parent)
        head.lock_ref = node.lock_ref
        head.last_access = node.last_access
        node.key, node.value = node.key[at:], node.value[at:]
        node.parent = head
        head.children[node.key[0]] = node
        parent.children[head.key[0]] = head
        return head

    # -- insert -----------------------------------------------------------------------------
    def insert(self, tokens: list[int], slots: torch.Tensor) -> tuple[int, RadixNode]:
        """Caches `tokens` -> `slots`. Returns (how many leading tokens were already cached, the
        node of the last token). The caller frees its own duplicate slots for that leading part;
        slots past it now belong to the tree."""
        if not self.enabled or not tokens:
            return 0, self.root
        node = self.root
        pos = 0
        now = time.monotonic()
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                new = RadixNode(list(tokens[pos:]), slots[pos:].clone(), node)
                new.last_access = now
                node.children[tokens[pos]] = new
                self.cached_slots += len(new.key)
                return pos, new
            shared = _common_prefix(child.key, tokens[pos:])
            if shared < len(child.key):
                child = self._split(child, shared)
            child.last_access = now
            node = child
            pos += shared
        return pos, node

    # -- locking ----------------------------------------------------------------------------
    def lock(self, node: RadixNode) -> None:
        while node is not None:
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: RadixNode) -> None:
        while node is not None:
            node.lock_ref -= 1
            assert node.lock_ref >= 0, "radix node unlocked more often than locked"
            node = node.parent

    # -- eviction ---------------------------------------------------------------------------
    def evict(self, needed: int) -> int:
        """Frees at least `needed` slots from unlocked leaves, LRU first, if that many exist."""
        leaves = [n for n in self._all_nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(leaves)
        freed = 0
        while freed < needed and leaves:
            leaf = heapq.heappop(leaves)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.key[0]]
            self._free_slots(leaf.value)
            freed += len(leaf.key)
            self.cached_slots -= len(leaf.key)
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, parent)
        return freed

    def _all_nodes(self) -> list[RadixNode]:
        out, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def flush(self) -> None:
        """Drops every cached prefix (only valid when no request holds a lock)."""
        for node in self._all_nodes():
            self._free_slots(node.value)
        self.reset()
