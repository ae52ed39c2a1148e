"""Draft indexes: where a request's next tokens may already have been written.

`NgramIndex` holds documents (earlier responses to a prompt, finished siblings, an external
corpus) as one append-only token array with a separator before each document, and per anchor
length a sorted array of hashed n-grams. `lookup(context, k)` finds the occurrences of the
longest suffix of `context` (anchors from `max_anchor` down to `min_anchor`, candidates ranked by
how far back, up to `max_match` tokens, their context agrees) and votes the continuation token by
token among the best ones (most frequent; ties go to the latest occurrence). It returns the draft
and a *cursor*: the corpus position of the token after the draft's first token's context in one
occurrence that agrees with the whole draft. Positions never move (the array only grows), so a
request that keeps accepting can follow its cursor with no further lookup (`follow`).

A context shorter than `max_anchor` first tries documents that *begin* with it (a response's
first tokens match earlier responses' first tokens, not arbitrary n-grams).

`SelfIndex` is prompt-lookup over a request's own prompt + output: the latest earlier occurrence
of its last n tokens (n from `max_anchor` down to `min_anchor`), updated as tokens arrive.

Costs: `add_document` marks the index dirty; the next lookup rebuilds it (numpy, O(N log N)).
A lookup is one `searchsorted` per anchor length tried plus O(candidates * max_match) numpy work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SEPARATOR = -1  # before every document; never a token id
_MASK = (1 << 64) - 1
_MULT = 0x9E3779B97F4A7C15  # odd 64-bit multiplier of the n-gram hash


@dataclass(frozen=True, slots=True)
class IndexConfig:
    """Matching parameters (SGLang's NGRAM: min/max match window, max trie depth)."""

    min_anchor: int = 1
    max_anchor: int = 4
    max_match: int = 16
    max_candidates: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.min_anchor <= self.max_anchor <= self.max_match:
            raise ValueError("IndexConfig needs 1 <= min_anchor <= max_anchor <= max_match")
        if self.max_candidates < 1:
            raise ValueError("IndexConfig needs max_candidates >= 1")


@dataclass(frozen=True, slots=True)
class Match:
    """A draft, how many context tokens backed it, and where to follow it in the corpus."""

    draft: list[int]
    match_len: int
    cursor: int  # corpus position of draft[0] in an occurrence agreeing with the whole draft


def _hash_tuple(tokens: Sequence[int]) -> int:
    h = 0
    for t in tokens:
        h = ((h ^ t) * _MULT) & _MASK
    return h


def _hash_array(tokens: np.ndarray, ends: np.ndarray, anchor: int) -> np.ndarray:
    """Hash of tokens[e - anchor : e] per end e; equals `_hash_tuple` (uint64 wraps)."""
    h = np.zeros(ends.size, dtype=np.uint64)
    mult = np.uint64(_MULT)
    with np.errstate(over="ignore"):
        for j in range(anchor, 0, -1):
            h = (h ^ tokens[ends - j].astype(np.uint64)) * mult
    return h


class NgramIndex:
    """Append-only documents with a hashed n-gram index; see the module docstring."""

    def __init__(self, config: IndexConfig | None = None) -> None:
        self.config = config or IndexConfig()
        self._parts: list[np.ndarray] = []
        self._tokens = np.zeros(0, dtype=np.int64)
        self._starts = np.zeros(0, dtype=np.int64)
        self._index: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._dirty = False
        self.num_tokens = 0
        self.num_documents = 0

    def add_document(self, tokens: Sequence[int] | np.ndarray) -> int:
        """Append one document; returns its token count. Ids must be >= 0."""
        arr = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if arr.size and int(arr.min()) < 0:
            raise ValueError("documents hold token ids >= 0")
        if arr.size == 0:
            return 0
        self._parts += [np.array([SEPARATOR], dtype=np.int64), arr]
        self.num_tokens += int(arr.size)
        self.num_documents += 1
        self._dirty = True
        return int(arr.size)

    # -- building ---------------------------------------------------------------------------

    def _build(self) -> None:
        self._tokens = np.concatenate([self._tokens, *self._parts]) if self._parts else self._tokens
        self._parts = []
        tokens = self._tokens
        self._starts = np.flatnonzero(tokens == SEPARATOR) + 1
        for a in range(self.config.min_anchor, self.config.max_anchor + 1):
            # pos: the token after an a-gram free of separators, itself not a separator.
            pos = np.arange(a, tokens.size, dtype=np.int64)
            ok = tokens[pos] != SEPARATOR
            for j in range(1, a + 1):
                ok &= tokens[pos - j] != SEPARATOR
            pos = pos[ok]
            keys = _hash_array(tokens, pos, a)
            order = np.argsort(keys, kind="stable")  # equal keys stay oldest-first
            self._index[a] = (keys[order], pos[order])
        self._dirty = False

    def build(self) -> None:
        """Index pending documents now (lookups do it lazily; call it off the hot path)."""
        if self._dirty:
            self._build()

    def _ready(self) -> np.ndarray:
        if self._dirty:
            self._build()
        return self._tokens

    # -- drafting ---------------------------------------------------------------------------

    def follow(self, cursor: int, k: int) -> list[int]:
        """Up to k tokens of the corpus from `cursor`, stopping at a document's end."""
        tokens = self._ready()
        out: list[int] = []
        for t in tokens[cursor : cursor + k].tolist():
            if t == SEPARATOR:
                break
            out.append(t)
        return out

    def token_at(self, cursor: int) -> int:
        tokens = self._ready()
        return int(tokens[cursor]) if 0 <= cursor < tokens.size else SEPARATOR

    def lookup(self, context: Sequence[int], k: int) -> Match | None:
        """The voted continuation of `context`'s longest matching suffix, or None."""
        if k <= 0 or self.num_documents == 0:
            return None
        tokens = self._ready()
        cfg = self.config
        tail = list(context[-cfg.max_match :])
        pos, match_len = self._prefix_candidates(tail)
        if pos.size == 0:
            pos, match_len = self._anchor_candidates(tail)
        if pos.size == 0:
            return None
        return self._vote(tokens, pos, match_len, k)

    def _prefix_candidates(self, tail: list[int]) -> tuple[np.ndarray, int]:
        """Documents that begin with the whole context (only for contexts shorter than an
        anchor, where a response's opening is the best evidence)."""
        n = len(tail)
        if n >= self.config.max_anchor:
            return np.zeros(0, dtype=np.int64), 0
        tokens = self._tokens
        pos = self._starts + n
        pos = pos[pos < tokens.size]
        if n:
            idx = pos[:, None] - n + np.arange(n)[None, :]
            pos = pos[(tokens[idx] == np.asarray(tail)[None, :]).all(axis=1)]
        pos = pos[tokens[pos] != SEPARATOR]
        return pos[-self.config.max_candidates :], n + 1  # +1: the document start matched too

    def _anchor_candidates(self, tail: list[int]) -> tuple[np.ndarray, int]:
        cfg = self.config
        tokens = self._tokens
        for a in range(min(cfg.max_anchor, len(tail)), cfg.min_anchor - 1, -1):
            keys, positions = self._index[a]
            key = np.uint64(_hash_tuple(tail[-a:]))
            lo = int(np.searchsorted(keys, key, side="left"))
            hi = int(np.searchsorted(keys, key, side="right"))
            if hi == lo:
                continue
            pos = positions[max(lo, hi - cfg.max_candidates) : hi]
            back = np.arange(1, len(tail) + 1)
            idx = pos[:, None] - back[None, :]
            valid = idx >= 0
            same = (tokens[np.maximum(idx, 0)] == np.asarray(tail[::-1])[None, :]) & valid
            match = np.cumprod(same, axis=1).sum(axis=1)
            best = int(match.max())
            if best < a:  # only hash collisions
                continue
            return pos[match == best], best
        return np.zeros(0, dtype=np.int64), 0

    def _vote(self, tokens: np.ndarray, pos: np.ndarray, match_len: int, k: int) -> Match | None:
        idx = np.minimum(pos[:, None] + np.arange(k)[None, :], tokens.size - 1)
        nxt = tokens[idx]
        nxt[pos[:, None] + np.arange(k)[None, :] >= tokens.size] = SEPARATOR
        alive = np.ones(pos.size, dtype=bool)
        draft: list[int] = []
        for t in range(k):
            col = nxt[:, t]
            live = alive & (col != SEPARATOR)
            if not live.any():
                break
            values, counts = np.unique(col[live], return_counts=True)
            top = values[counts == counts.max()]
            if top.size > 1:  # the latest live occurrence among the tied tokens
                choice = int(col[np.flatnonzero(live & np.isin(col, top))[-1]])
            else:
                choice = int(top[0])
            draft.append(choice)
            alive = live & (col == choice)
        if not draft:
            return None
        cursor = int(pos[np.flatnonzero(alive)[-1]])
        return Match(draft=draft, match_len=match_len, cursor=cursor)


class SelfIndex:
    """Prompt lookup over one request's own tokens (prompt + output so far)."""

    def __init__(self, config: IndexConfig | None = None) -> None:
        self.config = config or IndexConfig()
        self.tokens: list[int] = []
        # n-gram -> end position (exclusive) of its latest occurrence, covering grams that end
        # before the last token, so a lookup of the current suffix finds an *earlier* occurrence.
        self._latest: dict[tuple[int, ...], int] = {}
        self._indexed = 0

    def extend(self, tokens: Sequence[int]) -> None:
        self.tokens.extend(tokens)
        lo, hi = self.config.min_anchor, self.config.max_anchor
        for end in range(max(self._indexed, 1), len(self.tokens)):
            for n in range(lo, min(hi, end) + 1):
                self._latest[tuple(self.tokens[end - n : end])] = end
        self._indexed = len(self.tokens)

    def lookup(self, k: int) -> Match | None:
        cfg = self.config
        seq = self.tokens
        for n in range(min(cfg.max_anchor, len(seq)), cfg.min_anchor - 1, -1):
            end = self._latest.get(tuple(seq[-n:]))
            if end is not None:
                draft = seq[end : end + k]
                if draft:
                    return Match(draft=list(draft), match_len=n, cursor=end)
        return None
