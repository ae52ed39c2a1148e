"""Per-step drafts for decode rows, from three sources, with per-request adaptivity.

Sources, per request:
  (a) corpus: the external corpus the request names (`custom_params["spec_corpus_id"]`), e.g.
      the controller's earlier-epoch responses to this prompt, registered through
      `/add_external_corpus`;
  (b) siblings: finished responses of the same group (same prompt, or
      `custom_params["spec_group"]`), added as they finish (`SpecState.on_finished`);
  (c) self: the request's own prompt + output so far (prompt lookup).
A request follows its cursor in (a) or (b) — every occurrence that agrees with its output since
the last lookup, filtered as tokens arrive, voting the draft — with no lookup; only when no
occurrence agrees any more are all sources looked up, and the longest match wins (ties: corpus,
siblings, self). A lookup that finds nothing backs off (1, 2, 4, ... engine steps, up to
`probe_every`).

Adaptivity: each request keeps a decayed count of accepted and rejected draft tokens; it drafts
k tokens while its per-token acceptance estimate a has a**k >= draft_cost, so a request whose
drafts fail stops drafting and probes one token at every multiple of `probe_every` engine steps
(all such requests on the same steps, so the steps between stay plain decode steps, overlapped on
a GPU). The batch caps k so rows x (1 + k) stays within `verify_token_budget`.

Per batch (`batch_wants_draft`, what the scheduler asks): a drafting step is synchronous for every
row, so a step drafts only on a probe step or when the rows' expected accepted tokens reach the
break-even per row — the measured cost ratio of drafting to plain steps minus one (`step_costs`),
at least `min_batch_gain`.

Requests with repetition/frequency/presence penalties, still under min_new_tokens, under a
grammar, or asking for top / token-id logprobs do not draft: their logits (or what is recorded of
them) depend on the tokens before each position (see `acceptance`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from rollout_accel.serving.spec.config import SpecConfig
from rollout_accel.serving.spec.corpus import CorpusRegistry
from rollout_accel.serving.spec.draft_index import IndexConfig, Match, NgramIndex, SelfIndex
from rollout_accel.serving.spec.step_costs import StepCosts

CORPUS_FIELD = "spec_corpus_id"  # custom_params key naming a request's external corpus
GROUP_FIELD = "spec_group"  # custom_params key naming a request's sibling group

# Prior pseudo-counts of the acceptance estimate: starts at 2/3, and a request whose drafts
# always fail settles below any draft_cost >= 0.1 (0.5 / (0.5 + 1 / (1 - decay) + 0.25)).
_PRIOR_HIT, _PRIOR_MISS = 0.5, 0.25


class DraftParams(Protocol):
    custom_params: dict[str, Any] | None
    has_penalties: bool
    min_new_tokens: int
    max_new_tokens: int | None


class DraftRequest(Protocol):
    """What the proposer reads of an engine request."""

    rid: str
    input_ids: list[int]
    output_ids: list[int]
    params: DraftParams


@dataclass(slots=True)
class AcceptanceTracker:
    """Decayed counts of accepted draft tokens and first rejections."""

    hits: float = 0.0
    misses: float = 0.0

    @property
    def rate(self) -> float:
        return (self.hits + _PRIOR_HIT) / (self.hits + self.misses + _PRIOR_HIT + _PRIOR_MISS)

    def record(self, drafted: int, accepted: int, decay: float) -> None:
        self.hits = self.hits * decay + accepted
        self.misses = self.misses * decay + (1.0 if accepted < drafted else 0.0)

    def expected_accepted(self, k: int) -> float:
        """Expected accepted tokens of a k-token draft: sum of rate**i, i = 1..k."""
        a = self.rate
        return k if a >= 1.0 else a * (1.0 - a**k) / (1.0 - a)

    def draft_len(self, k_max: int, cost: float) -> int:
        """Largest k <= k_max with rate**k >= cost (0 when even one token does not pay)."""
        a = self.rate
        if a <= cost:
            return 0
        return min(k_max, int(math.log(cost) / math.log(a)) if a < 1.0 else k_max)


_FRESH = AcceptanceTracker()  # the estimate of a request that has not drafted yet (read only)


@dataclass(slots=True)
class _Cursor:
    """Where a request is in one source: the corpus positions of its next token in every
    occurrence that agrees with its output since the lookup (filtered as tokens arrive)."""

    source: str
    index: NgramIndex
    positions: list[int]


@dataclass(slots=True)
class RequestDrafts:
    """One request's drafting state: sources, the followed cursor, acceptance, counters."""

    corpus_id: str | None
    group_key: Any
    own: SelfIndex
    tracker: AcceptanceTracker = field(default_factory=AcceptanceTracker)
    cursor: _Cursor | None = None
    synced: int = 0  # output tokens folded into `own` and the cursor
    next_probe: int = -1  # engine step at which a request that stopped drafting probes again
    retry_at: int = 0  # engine step before which lookups are skipped (after a miss)
    next_backoff: int = 1
    verify_ct: int = 0
    draft_token_num: int = 0
    accept_token_num: int = 0


def group_key_of(req: DraftRequest) -> Any:
    custom = req.params.custom_params or {}
    group = custom.get(GROUP_FIELD)
    if isinstance(group, str) and group:
        return ("group", group)
    return ("prompt", len(req.input_ids), hash(tuple(req.input_ids)))


class Proposer:
    """Drafts for a batch of decode rows; owns per-request state and the sibling indexes."""

    def __init__(self, config: SpecConfig, registry: CorpusRegistry) -> None:
        self.config = config
        self.registry = registry
        self.index_config = IndexConfig(
            min_anchor=config.min_match, max_anchor=config.max_anchor, max_match=config.max_match
        )
        self.groups: OrderedDict[Any, NgramIndex] = OrderedDict()
        self.costs = StepCosts()  # measured by the engine loop (see step_costs)
        self.requests: dict[str, RequestDrafts] = {}
        # Processed engine steps (`tick`). Probes fall on multiples of probe_every for every
        # request at once, so the steps in between stay plain (and overlapped) decode steps.
        self.steps = 0

    def tick(self) -> None:
        """One engine step was processed."""
        self.steps += 1

    def _next_probe_step(self) -> int:
        every = self.config.probe_every
        return (self.steps // every + 1) * every

    def _eligible(self, req: DraftRequest) -> bool:
        """Rows whose next-token distribution depends only on the logits: no penalties, past
        min_new_tokens, no grammar (its mask advances per token), no top/ids logprobs (recorded
        by the plain sampler only)."""
        params = req.params
        return (
            not params.has_penalties
            and len(req.output_ids) >= params.min_new_tokens
            and getattr(req, "grammar", None) is None
            and getattr(req, "extra_logprobs", None) is None
        )

    def wanted_draft_len(self, req: DraftRequest, k_batch: int) -> int | None:
        """The draft length `req` would take at the next step (0: only if it is a probe step),
        or None when it will not draft then (its last token then need not be on the host);
        cheap, and without side effects."""
        if k_batch <= 0 or not self._eligible(req):
            return None
        st = self.requests.get(req.rid)
        if st is None:
            return _FRESH.draft_len(k_batch, self.config.draft_cost)
        k = st.tracker.draft_len(k_batch, self.config.draft_cost)
        if k == 0:
            return 0 if st.next_probe <= self.steps else None
        return k if st.cursor is not None or st.retry_at <= self.steps else None

    def batch_wants_draft(self, ready: Sequence[DraftRequest], pending: int = 0) -> bool:
        """Whether a step over these decode rows should draft: a probe is due, or the rows'
        expected accepted tokens reach `min_batch_gain` per row (see SpecConfig), or more if the
        measured cost of a drafting step demands it (`costs.break_even_gain`). `pending`:
        steps that will be processed before this one (1 when asked while a step is in flight),
        so the probe schedule reads the same whether asked early or when the step is built."""
        k_batch = self.batch_draft_len(len(ready))
        if k_batch <= 0:
            return False
        per_row = self.config.min_batch_gain
        measured = self.costs.break_even_gain()
        if measured is not None:  # what a drafting step costs here, measured
            per_row = max(per_row, measured)
        need = per_row * len(ready)
        # Probe steps (every probe_every-th, the same for every row) draft whenever any row
        # wants to: that is how rows below the gate, or stopped, learn that drafts pay again.
        probe_step = (self.steps + pending) % self.config.probe_every == 0
        gain = 0.0
        for req in ready:
            k = self.wanted_draft_len(req, k_batch)
            if k is None:
                continue
            if probe_step:
                return True
            st = self.requests.get(req.rid)
            gain += (st.tracker if st is not None else _FRESH).expected_accepted(k)
            if gain >= need:
                return True
        return False

    # -- per-request state ------------------------------------------------------------------

    def state(self, req: DraftRequest) -> RequestDrafts:
        st = self.requests.get(req.rid)
        if st is None:
            custom = req.params.custom_params or {}
            corpus = custom.get(CORPUS_FIELD)
            own = SelfIndex(self.index_config)
            own.extend(req.input_ids)
            st = RequestDrafts(
                corpus_id=corpus if isinstance(corpus, str) and corpus else None,
                group_key=group_key_of(req),
                own=own,
            )
            self.requests[req.rid] = st
        return st

    def _sync(self, st: RequestDrafts, output: list[int]) -> None:
        """Fold tokens emitted since the last call into the self index and the cursor."""
        if len(output) < st.synced:  # cannot happen in the engine; start over if it does
            st.synced, st.cursor = 0, None
        new = output[st.synced :]
        if not new:
            return
        st.own.extend(new)
        cur = st.cursor
        if cur is not None:
            # Occurrences that disagree with the emitted tokens drop out; a mismatch with the
            # draft often leaves another occurrence that agrees, and no lookup is needed.
            cur.positions = cur.index.advance(cur.positions, new) if self._live(st, cur) else []
            if not cur.positions:
                st.cursor = None
        st.synced = len(output)

    def _live(self, st: RequestDrafts, cur: _Cursor) -> bool:
        """The index a cursor points into is still served (a corpus may have been removed)."""
        if cur.source == "corpus":
            return st.corpus_id is not None and self.registry.get(st.corpus_id) is cur.index
        return self.groups.get(st.group_key) is cur.index

    # -- drafting ---------------------------------------------------------------------------

    def batch_draft_len(self, rows: int) -> int:
        cfg = self.config
        if rows <= 0:
            return 0
        return max(0, min(cfg.max_drafts, cfg.verify_token_budget // rows - 1))

    def propose(self, batch: Sequence[DraftRequest]) -> list[list[int]]:
        """Draft tokens per row (possibly empty) for these decode rows."""
        k_batch = self.batch_draft_len(len(batch))
        return [self.propose_one(req, k_batch) for req in batch]

    def propose_one(self, req: DraftRequest, k_batch: int) -> list[int]:
        st = self.state(req)
        self._sync(st, req.output_ids)
        params = req.params
        if k_batch <= 0 or not self._eligible(req):
            return []
        k = st.tracker.draft_len(k_batch, self.config.draft_cost)
        if k == 0:
            if st.next_probe < 0:
                st.next_probe = self._next_probe_step()
            if st.next_probe > self.steps:
                return []
            st.next_probe = self._next_probe_step()
            k = 1  # probe
        else:
            st.next_probe = -1
        if params.max_new_tokens is not None:
            # The bonus token is always emitted: drafts beyond max_new_tokens - 1 are wasted.
            k = min(k, params.max_new_tokens - len(req.output_ids) - 1)
        if k <= 0:
            return []
        return self._draft(st, req, k)

    def _draft(self, st: RequestDrafts, req: DraftRequest, k: int) -> list[int]:
        cur = st.cursor
        if cur is not None:
            draft = cur.index.vote(cur.positions, k)
            if draft:
                return draft
            st.cursor = None
        if st.retry_at > self.steps:
            return []
        best: tuple[str, NgramIndex | None, Match] | None = None
        for source, index in self._sources(st):
            if index is None:
                found = st.own.lookup(k)
            else:
                found = index.lookup(req.output_ids, k)
            if found is not None and (best is None or found.match_len > best[2].match_len):
                best = (source, index, found)
        if best is None:
            st.retry_at = self.steps + st.next_backoff
            st.next_backoff = min(2 * st.next_backoff, self.config.probe_every)
            return []
        st.next_backoff = 1
        source, index, found = best
        if index is not None:
            st.cursor = _Cursor(source, index, list(found.candidates))
        return found.draft

    def _sources(self, st: RequestDrafts) -> list[tuple[str, NgramIndex | None]]:
        out: list[tuple[str, NgramIndex | None]] = []
        if st.corpus_id is not None:
            corpus = self.registry.get(st.corpus_id)
            if corpus is not None:
                out.append(("corpus", corpus))
        group = self.groups.get(st.group_key)
        if group is not None:
            out.append(("siblings", group))
        out.append(("self", None))
        return out

    # -- feedback ---------------------------------------------------------------------------

    def on_verified(self, req: DraftRequest, drafted: int, accepted: int) -> None:
        """A decode step of `req` scored `drafted` draft tokens and accepted `accepted`."""
        st = self.state(req)
        st.verify_ct += 1
        if drafted:
            st.draft_token_num += drafted
            st.accept_token_num += accepted
            st.tracker.record(drafted, accepted, self.config.accept_decay)

    def on_finished(self, req: DraftRequest, add_to_group: bool = True) -> RequestDrafts | None:
        """Drop the request's state; its response joins its group's sibling index."""
        st = self.requests.pop(req.rid, None)
        if add_to_group and req.output_ids:
            key = st.group_key if st is not None else group_key_of(req)
            self.add_sibling(key, req.output_ids)
        return st

    def add_sibling(self, key: Any, tokens: Sequence[int]) -> None:
        index = self.groups.get(key)
        if index is None:
            index = self.groups[key] = NgramIndex(self.index_config)
            while len(self.groups) > self.config.max_groups:
                self.groups.popitem(last=False)
        else:
            self.groups.move_to_end(key)
        if index.num_tokens + len(tokens) <= self.config.max_group_tokens:
            index.add_document(tokens)
