"""Speculative-decoding drafts from earlier responses to the same prompt.

Responses to one prompt repeat much of earlier responses to it (SPEC-RL: 50-70% overlap between
epochs) and of their siblings in the same group. Given the tokens generated so far, the index
finds where the *longest suffix* of them occurs in the prompt's corpus and proposes the tokens
that followed, voting across occurrences token by token (a cheap multi-path draft, after Seer).

Per prompt the corpus is the history's stored responses (`HistoryStore.responses`, bounded per
prompt) plus responses added in memory with `add_response` (finished siblings of the running
group: drafts help from the first step, before any epoch repeats). The index over it is a sorted
array of hashed `anchor`-grams: a lookup is one binary search, then candidate matches are
extended backwards up to `max_match` tokens, in numpy; the longest ones vote. Corpora are built
lazily per prompt and kept in an LRU of `cache_prompts`.

Engines: the in-process engine calls `propose(key, generated, k)` per decode step of a request.
SGLang's NGRAM speculative decoding can take the same corpus: `corpus_request(...)` builds the
body of its `/add_external_corpus` endpoint (`corpus_id`, `token_chunks`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InvalidArgumentError, InvalidConfigError, UnknownPromptError
from .history import HistoryStore
from .records import PromptKey, check_prompt_key

_SENTINEL = -1  # separates responses; never equals a token id
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier of the rolling anchor hash


@dataclass(frozen=True, slots=True)
class DraftConfig:
    """Matching: the index is looked up with the last `anchor` generated tokens, falling back to
    shorter anchors down to `min_anchor`; candidates are ranked by how far (up to `max_match`
    tokens) their context matches."""

    anchor: int = 3
    min_anchor: int = 1
    max_match: int = 16
    max_candidates: int = 64
    cache_prompts: int = 1024
    max_corpus_tokens: int = 1 << 18  # per prompt; the oldest responses are dropped beyond it

    def __post_init__(self) -> None:
        if not 1 <= self.min_anchor <= self.anchor <= self.max_match:
            raise InvalidConfigError("DraftConfig needs 1 <= min_anchor <= anchor <= max_match")
        if self.max_candidates < 1 or self.cache_prompts < 1 or self.max_corpus_tokens < 1:
            raise InvalidConfigError(
                "DraftConfig needs max_candidates, cache_prompts, max_corpus_tokens >= 1"
            )


class _PromptCorpus:
    """One prompt's responses, concatenated with sentinels, and a sorted anchor-gram index."""

    def __init__(self, responses: list[np.ndarray], config: DraftConfig) -> None:
        self.config = config
        self.responses = responses
        self._dirty = True
        self.tokens = np.zeros(0, dtype=np.int64)
        self.starts = np.zeros(0, dtype=np.int64)
        # anchor length -> (sorted hashes, positions): one sorted index per anchor length.
        self.index: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def add(self, tokens: np.ndarray) -> None:
        self.responses.append(tokens)
        total = sum(r.size for r in self.responses)
        while len(self.responses) > 1 and total > self.config.max_corpus_tokens:
            total -= self.responses.pop(0).size
        self._dirty = True

    def _build(self) -> None:
        parts: list[np.ndarray] = [np.array([_SENTINEL])]
        starts = []
        at = 1
        for r in self.responses:
            starts.append(at)
            parts += [r.astype(np.int64), np.array([_SENTINEL])]
            at += r.size + 1
        self.tokens = np.concatenate(parts)
        self.starts = np.array(starts, dtype=np.int64)
        for a in range(self.config.min_anchor, self.config.anchor + 1):
            # pos: index of the token that follows an a-gram free of sentinels.
            pos = np.arange(a, self.tokens.size, dtype=np.int64)
            ok = np.ones(pos.size, dtype=bool)
            for j in range(1, a + 1):
                ok &= self.tokens[pos - j] != _SENTINEL
            pos = pos[ok]
            keys = _hash(self.tokens, pos, a)
            order = np.argsort(keys, kind="stable")  # stable: equal keys stay oldest-first
            self.index[a] = (keys[order], pos[order])
        self._dirty = False

    def candidates(self, tail: np.ndarray) -> tuple[np.ndarray, int]:
        """Positions following the longest matches of `tail`'s suffix, and that match length."""
        if self._dirty:
            self._build()
        cfg = self.config
        if tail.size < cfg.min_anchor:
            # Too little generated to anchor on: continue earlier responses that start the same.
            pos = self.starts + tail.size
            pos = pos[pos < self.tokens.size]
            if tail.size:
                idx = pos[:, None] - tail.size + np.arange(tail.size)[None, :]
                pos = pos[(self.tokens[idx] == tail[None, :]).all(axis=1)]
            return pos[-cfg.max_candidates :], int(tail.size)
        pos = np.zeros(0, dtype=np.int64)
        used = 0
        for used in range(min(cfg.anchor, tail.size), cfg.min_anchor - 1, -1):
            a = used
            keys, positions = self.index[a]
            key = _hash(tail, np.array([tail.size]), a)[0]
            lo = int(np.searchsorted(keys, key, side="left"))
            hi = int(np.searchsorted(keys, key, side="right"))
            pos = positions[max(lo, hi - cfg.max_candidates) : hi]
            if pos.size:
                break
        if pos.size == 0:
            return pos, 0
        depth = min(cfg.max_match, tail.size)
        back = np.arange(1, depth + 1)
        idx = np.maximum(pos[:, None] - back[None, :], 0)
        same = self.tokens[idx] == tail[::-1][None, :depth]
        match = np.cumprod(same, axis=1).sum(axis=1)
        best = int(match.max())
        if best < used:  # a hash collision, not a real match
            return pos[:0], 0
        return pos[match == best], best

    def draft(self, pos: np.ndarray, k: int) -> list[int]:
        """Vote the continuation token by token; ties go to the most recent occurrence."""
        if pos.size == 0 or k == 0:
            return []
        idx = np.minimum(pos[:, None] + np.arange(k)[None, :], self.tokens.size - 1)
        nxt = self.tokens[idx]
        alive = np.ones(pos.size, dtype=bool)
        out: list[int] = []
        for t in range(k):
            col = nxt[:, t]
            live = alive & (col != _SENTINEL)
            if not live.any():
                break
            values, counts = np.unique(col[live], return_counts=True)
            top = values[counts == counts.max()]
            if top.size > 1:  # the latest live occurrence among the tied tokens
                latest = np.flatnonzero(live & np.isin(col, top))[-1]
                choice = col[latest]
            else:
                choice = top[0]
            out.append(int(choice))
            alive = live & (col == choice)
        return out


class DraftIndex:
    """Proposes the next k tokens of a response from earlier responses to the same prompt."""

    def __init__(
        self, store: HistoryStore | None = None, config: DraftConfig | None = None
    ) -> None:
        self.store = store
        self.config = config or DraftConfig()
        self._cache: OrderedDict[PromptKey, _PromptCorpus] = OrderedDict()

    def propose(self, key: PromptKey, generated: Sequence[int] | np.ndarray, k: int) -> list[int]:
        """Up to k draft tokens to follow `generated`; [] when the corpus has no match.

        A prompt without history or responses has an empty corpus (not an error: the engine
        asks for every request).
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
            raise InvalidArgumentError(f"propose: k={k!r} must be an int >= 0")
        corpus = self._corpus(check_prompt_key(key))
        if not corpus.responses or k == 0:
            return []
        window = self.config.max_match
        tail = _tokens(generated[-window:] if len(generated) > window else generated, "generated")
        pos, _ = corpus.candidates(tail)
        return corpus.draft(pos, int(k))

    def add_response(self, key: PromptKey, tokens: Sequence[int] | np.ndarray) -> None:
        """Add a response (e.g. a finished sibling of the running group) to the prompt's corpus."""
        self._corpus(check_prompt_key(key)).add(_tokens(tokens, "tokens"))

    def forget(self, keys: Iterable[PromptKey] | None = None) -> None:
        """Drop cached corpora (all, or of `keys`) so the next use re-reads the history."""
        if keys is None:
            self._cache.clear()
            return
        for key in keys:
            self._cache.pop(check_prompt_key(key), None)

    def corpus(self, key: PromptKey) -> list[np.ndarray]:
        """The responses drafts for `key` come from, oldest first."""
        return list(self._corpus(check_prompt_key(key)).responses)

    def token_chunks(
        self, keys: Iterable[PromptKey] | None = None, max_tokens: int = 1 << 22
    ) -> list[list[int]]:
        """The corpus as SGLang `token_chunks`: one list of token ids per stored response.

        keys=None exports every prompt with stored responses, most recently rolled out first,
        then those only held in memory; export stops before exceeding `max_tokens`.
        """
        if keys is None:
            listed = self.store.keys_with_responses() if self.store is not None else []
            keys = list(dict.fromkeys([*listed, *self._cache]))
        chunks: list[list[int]] = []
        total = 0
        for key in keys:
            for r in self.corpus(key):
                if total + r.size > max_tokens:
                    return chunks
                if r.size:
                    chunks.append(r.tolist())
                    total += r.size
        return chunks

    def _corpus(self, key: PromptKey) -> _PromptCorpus:
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
            return found
        responses: list[np.ndarray] = []
        if self.store is not None:
            try:
                responses = [r.astype(np.int64) for r in self.store.responses(key)]
            except UnknownPromptError:
                responses = []
        corpus = _PromptCorpus([], self.config)
        for r in responses:
            corpus.add(r)
        self._cache[key] = corpus
        while len(self._cache) > self.config.cache_prompts:
            self._cache.popitem(last=False)
        return corpus


def corpus_request(corpus_id: str, token_chunks: list[list[int]]) -> dict[str, object]:
    """The JSON body of SGLang's `/add_external_corpus` for these chunks."""
    if not corpus_id:
        raise InvalidArgumentError("corpus_request: corpus_id must be a non-empty string")
    return {"corpus_id": corpus_id, "token_chunks": token_chunks}


def _tokens(value: Sequence[int] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise InvalidArgumentError(f"{name} must be a 1-D sequence of token ids")
    if arr.size and arr.min() < 0:
        raise InvalidArgumentError(f"{name} holds a negative token id")
    return arr.astype(np.int64)


def _hash(tokens: np.ndarray, ends: np.ndarray, anchor: int) -> np.ndarray:
    """Hash of tokens[e - anchor : e] for each end e (uint64 arithmetic wraps, by design)."""
    h = np.zeros(ends.size, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(anchor, 0, -1):
            h = (h ^ tokens[ends - j].astype(np.uint64)) * _MULT
    return h
