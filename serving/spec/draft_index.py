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

Costs: documents added since the last lookup are indexed then as one new segment (numpy,
O(n log n) in the new tokens); past a few segments they are merged (amortised O(log) rebuilds
as siblings arrive one by one). A lookup is two `searchsorted` per segment and anchor length
tried, then pure Python over the candidates (O(candidates * max_match)): it runs once per
rejecting row per verify step, on the engine's critical path, where numpy's per-call overhead
dominated (~0.25 ms a lookup).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SEPARATOR = -1  # before every document; never a token id
_MASK = (1 << 64) - 1
_MULT = 0x9E3779B97F4A7C15  # odd 64-bit multiplier of the n-gram hash
_SEP_ARRAY = np.array([SEPARATOR], dtype=np.int64)
_MAX_SEGMENTS = 4  # index segments searched per lookup before they are merged into one


@dataclass(frozen=True, slots=True)
class IndexConfig:
    """Matching parameters (SGLang's NGRAM: min/max match window, max trie depth)."""

    min_anchor: int = 1
    max_anchor: int = 4
    max_match: int = 16
    max_candidates: int = 16

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
    # Corpus positions of the request's next token in every occurrence the vote started from
    # (ascending): a request keeps them and filters them as its tokens arrive (`advance`).
    candidates: tuple[int, ...] = ()


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
        # Every document, a separator before each; 8 bytes a token, fast scalar reads.
        self._tokens = array("q")
        # Index segments, oldest first: anchor -> (sorted n-gram hashes, their end positions).
        self._segments: list[dict[int, tuple[np.ndarray, np.ndarray]]] = []
        self._pending: list[np.ndarray] = []  # documents added since the last build
        self._pending_base = 0  # corpus position of the first pending separator
        # Document openings: first n tokens (n < max_anchor) -> start positions, in order.
        self._openings: dict[tuple[int, ...], list[int]] = {}
        # Every token id in the documents: a context ending in a token the corpus never holds
        # matches no n-gram, and sampled text often ends that way (O(1) instead of a search per
        # anchor length and segment).
        self._vocab: set[int] = set()
        self.num_tokens = 0
        self.num_documents = 0

    def add_document(self, tokens: Sequence[int] | np.ndarray) -> int:
        """Append one document; returns its token count. Ids must be >= 0."""
        arr = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if arr.size and int(arr.min()) < 0:
            raise ValueError("documents hold token ids >= 0")
        if arr.size == 0:
            return 0
        if not self._pending:
            self._pending_base = len(self._tokens)
        self._tokens.append(SEPARATOR)
        start = len(self._tokens)
        self._tokens.frombytes(arr.tobytes())
        self._pending.append(arr)
        self._vocab.update(arr.tolist())
        opening = arr[: self.config.max_anchor - 1].tolist()
        for n in range(len(opening) + 1):
            self._openings.setdefault(tuple(opening[:n]), []).append(start)
        self.num_tokens += int(arr.size)
        self.num_documents += 1
        return int(arr.size)

    # -- building ---------------------------------------------------------------------------

    def _build(self) -> None:
        """Indexes the pending documents as one new segment; past `_MAX_SEGMENTS` segments,
        everything is re-indexed as one (amortised: a group's siblings arrive one by one)."""
        if not self._pending:
            return
        if len(self._segments) >= _MAX_SEGMENTS:
            self._segments = []
            base, seg = 0, np.frombuffer(self._tokens.tobytes(), dtype=np.int64)
        else:
            parts = [p for arr in self._pending for p in (_SEP_ARRAY, arr)]
            base, seg = self._pending_base, np.concatenate(parts)
        self._pending = []
        index: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for a in range(self.config.min_anchor, self.config.max_anchor + 1):
            # pos: the token after an a-gram free of separators, itself not a separator.
            pos = np.arange(a, seg.size, dtype=np.int64)
            ok = seg[pos] != SEPARATOR
            for j in range(1, a + 1):
                ok &= seg[pos - j] != SEPARATOR
            pos = pos[ok]
            keys = _hash_array(seg, pos, a)
            order = np.argsort(keys, kind="stable")  # equal keys stay oldest-first
            index[a] = (keys[order], pos[order] + base)
        self._segments.append(index)

    def build(self) -> None:
        """Index pending documents now (lookups do it lazily; call it off the hot path)."""
        self._build()

    # -- drafting ---------------------------------------------------------------------------

    def follow(self, cursor: int, k: int) -> list[int]:
        """Up to k tokens of the corpus from `cursor`, stopping at a document's end."""
        out = self._tokens[cursor : cursor + k].tolist()
        if SEPARATOR in out:
            del out[out.index(SEPARATOR) :]
        return out

    def token_at(self, cursor: int) -> int:
        tokens = self._tokens
        return tokens[cursor] if 0 <= cursor < len(tokens) else SEPARATOR

    def lookup(self, context: Sequence[int], k: int) -> Match | None:
        """The voted continuation of `context`'s longest matching suffix, or None.

        Pure Python over the few candidates (numpy only for the sorted-hash search): a lookup
        is on the engine's critical path, once per rejecting row per verify step."""
        if k <= 0 or self.num_documents == 0:
            return None
        self._build()
        tail = list(context[-self.config.max_match :])
        pos, match_len = self._prefix_candidates(tail)
        if not pos:
            pos, match_len = self._anchor_candidates(tail)
        if not pos:
            return None
        return self._vote(pos, match_len, k)

    def _prefix_candidates(self, tail: list[int]) -> tuple[list[int], int]:
        """Documents that begin with the whole context (only for contexts shorter than an
        anchor, where a response's opening is the best evidence)."""
        n = len(tail)
        if n >= self.config.max_anchor:
            return [], 0
        tokens = self._tokens
        size = len(tokens)
        starts = self._openings.get(tuple(tail), [])
        pos = [s + n for s in starts if s + n < size and tokens[s + n] != SEPARATOR]
        return pos[-self.config.max_candidates :], n + 1  # +1: the document start matched too

    def _anchor_candidates(self, tail: list[int]) -> tuple[list[int], int]:
        cfg = self.config
        tokens = self._tokens
        n = len(tail)
        # Only suffixes whose every token occurs in the corpus can match.
        vocab = self._vocab
        known = 0
        while known < min(cfg.max_anchor, n) and tail[n - 1 - known] in vocab:
            known += 1
        for a in range(known, cfg.min_anchor - 1, -1):
            key = _hash_tuple(tail[-a:])
            # [key, key + 1) in one search (a key of 2**64 - 1 is only ever a collision's loss).
            bounds = np.array([key, min(key + 1, _MASK)], dtype=np.uint64)
            found: list[int] = []
            for segment in self._segments:
                keys, positions = segment[a]
                lo, hi = keys.searchsorted(bounds).tolist()
                if hi > lo:
                    found += positions[max(lo, hi - cfg.max_candidates) : hi].tolist()
            if not found:
                continue
            # How far back each occurrence agrees with the context; keep the best.
            best, chosen = -1, []
            for p in found[-cfg.max_candidates :]:
                m = 0
                while m < n and p - m > 0 and tokens[p - m - 1] == tail[n - 1 - m]:
                    m += 1
                if m > best:
                    best, chosen = m, [p]
                elif m == best:
                    chosen.append(p)
            if best < a:  # only hash collisions
                continue
            return chosen, best
        return [], 0

    def advance(self, positions: Sequence[int], new: Sequence[int]) -> list[int]:
        """The candidate positions whose corpus text continues with `new`, moved past it."""
        tokens = self._tokens
        n = len(new)
        want = list(new)
        return [p + n for p in positions if tokens[p : p + n].tolist() == want]

    def vote(self, positions: Sequence[int], k: int) -> list[int]:
        """The draft voted among candidate positions (as in `lookup`), [] when none continues."""
        found = self._vote(list(positions), 0, k)
        return found.draft if found is not None else []

    def _vote(self, pos: list[int], match_len: int, k: int) -> Match | None:
        tokens = self._tokens
        size = len(tokens)
        if len(pos) == 1:  # one occurrence (the common case once a row follows its cursor)
            draft = self.follow(pos[0], k)
            if not draft:
                return None
            return Match(draft=draft, match_len=match_len, cursor=pos[0], candidates=(pos[0],))
        alive = pos  # ascending corpus positions
        draft: list[int] = []
        for t in range(k):
            counts: dict[int, int] = {}
            latest: dict[int, int] = {}
            for i, p in enumerate(alive):
                if p + t >= size:
                    continue
                tok = tokens[p + t]
                if tok != SEPARATOR:
                    counts[tok] = counts.get(tok, 0) + 1
                    latest[tok] = i
            if not counts:
                break
            most = max(counts.values())
            # Most frequent; ties go to the latest live occurrence.
            choice = max((tok for tok, c in counts.items() if c == most), key=latest.__getitem__)
            draft.append(choice)
            alive = [p for p in alive if p + t < size and tokens[p + t] == choice]
        if not draft:
            return None
        return Match(draft=draft, match_len=match_len, cursor=alive[-1], candidates=tuple(pos))


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
        """Appends tokens; they are indexed at the next lookup (most rows follow a corpus
        cursor and never look up, so indexing every token eagerly was wasted work)."""
        self.tokens.extend(tokens)

    def _catch_up(self) -> None:
        lo, hi = self.config.min_anchor, self.config.max_anchor
        seq, latest = self.tokens, self._latest
        for end in range(max(self._indexed, 1), len(seq)):
            for n in range(lo, min(hi, end) + 1):
                latest[tuple(seq[end - n : end])] = end
        self._indexed = len(seq)

    def lookup(self, k: int) -> Match | None:
        self._catch_up()
        cfg = self.config
        seq = self.tokens
        for n in range(min(cfg.max_anchor, len(seq)), cfg.min_anchor - 1, -1):
            end = self._latest.get(tuple(seq[-n:]))
            if end is not None:
                draft = seq[end : end + k]
                if draft:
                    return Match(draft=list(draft), match_len=n, cursor=end)
        return None
