"""Draft indexes, the corpus registry and the proposer's sources and adaptivity."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from rollout_accel.serving.spec.config import SpecConfig
from rollout_accel.serving.spec.corpus import SGLANG_SEPARATOR, CorpusError, CorpusRegistry
from rollout_accel.serving.spec.draft_index import IndexConfig, NgramIndex, SelfIndex
from rollout_accel.serving.spec.proposer import CORPUS_FIELD, GROUP_FIELD, Proposer

# -- NgramIndex -------------------------------------------------------------------------------


def test_longest_match_wins_over_frequent_short_match() -> None:
    ix = NgramIndex(IndexConfig(min_anchor=1, max_anchor=3, max_match=8))
    ix.add_document([1, 2, 3, 4, 5, 6])
    for _ in range(3):
        ix.add_document([9, 3, 7, 7, 7])  # "3" is followed by 7 three times
    m = ix.lookup([1, 2, 3], 3)
    assert m is not None and m.draft == [4, 5, 6] and m.match_len == 3
    m = ix.lookup([8, 8, 3], 2)  # only "3" matches: the frequent continuation
    assert m is not None and m.draft == [7, 7]


def test_vote_ties_go_to_latest_and_drafts_stop_at_document_end() -> None:
    ix = NgramIndex()
    ix.add_document([5, 6, 1, 2])
    ix.add_document([5, 6, 3])
    m = ix.lookup([0, 5, 6], 4)
    assert m is not None and m.draft == [3]  # tie 1 vs 3: latest; document ends after 3
    assert ix.follow(m.cursor, 5) == [3]


def test_short_context_matches_document_openings() -> None:
    ix = NgramIndex(IndexConfig(max_anchor=4))
    ix.add_document([7, 8, 9, 10])
    ix.add_document([1, 7, 8, 2])
    m = ix.lookup([], 3)  # nothing generated yet: the openings vote
    assert m is not None and m.draft in ([7, 8, 9], [1, 7, 8])
    m = ix.lookup([7], 3)  # "7" opens document 0; mid-document 7 8 2 is not preferred
    assert m is not None and m.draft == [8, 9, 10]


def test_cursor_follows_and_documents_append() -> None:
    ix = NgramIndex()
    ix.add_document([1, 2, 3, 4, 5, 6, 7])
    m = ix.lookup([1, 2], 2)
    assert m is not None and m.draft == [3, 4]
    assert ix.follow(m.cursor + 2, 10) == [5, 6, 7]
    ix.add_document([2, 3, 9])  # positions of the first document do not move
    assert ix.follow(m.cursor, 3) == [3, 4, 5]
    assert ix.num_tokens == 10 and ix.num_documents == 2
    with pytest.raises(ValueError):
        ix.add_document([1, -3])


def _brute_force_lookup(docs: list[list[int]], context: list[int], k: int, cfg: IndexConfig):
    """The lookup rule by exhaustive scan: the oracle of NgramIndex (no hashing, no segments)."""
    corpus: list[int] = []
    starts = []
    for d in docs:
        corpus.append(-1)
        starts.append(len(corpus))
        corpus += d
    tail = context[-cfg.max_match :]
    n = len(tail)
    if n < cfg.max_anchor:
        pos = [
            s + n
            for s in starts
            if s + n < len(corpus) and corpus[s : s + n] == tail and corpus[s + n] != -1
        ][-cfg.max_candidates :]
        if pos:
            return _brute_vote(corpus, pos, n + 1, k)
    for a in range(min(cfg.max_anchor, n), cfg.min_anchor - 1, -1):
        pos = [
            p
            for p in range(a, len(corpus))
            if corpus[p] != -1 and -1 not in corpus[p - a : p] and corpus[p - a : p] == tail[-a:]
        ][-cfg.max_candidates :]
        if not pos:
            continue

        def agree(p: int) -> int:
            m = 0
            while m < n and p - m > 0 and corpus[p - m - 1] == tail[n - 1 - m]:
                m += 1
            return m

        best = max(agree(p) for p in pos)
        return _brute_vote(corpus, [p for p in pos if agree(p) == best], best, k)
    return None


def _brute_vote(corpus: list[int], pos: list[int], match_len: int, k: int):
    alive, draft = pos, []
    for t in range(k):
        col = [(i, corpus[p + t]) for i, p in enumerate(alive) if p + t < len(corpus)]
        col = [(i, tok) for i, tok in col if tok != -1]
        if not col:
            break
        counts: dict[int, int] = {}
        for _, tok in col:
            counts[tok] = counts.get(tok, 0) + 1
        most = max(counts.values())
        choice = [tok for _, tok in col if counts[tok] == most][-1]
        draft.append(choice)
        alive = [p for p in alive if p + t < len(corpus) and corpus[p + t] == choice]
    return (draft, match_len, alive[-1]) if draft else None


@pytest.mark.parametrize("seed", range(6))
def test_lookup_matches_an_exhaustive_scan(seed: int) -> None:
    import random

    rng = random.Random(seed)
    cfg = IndexConfig(min_anchor=1, max_anchor=4, max_match=8, max_candidates=rng.choice([3, 64]))
    ix = NgramIndex(cfg)
    docs: list[list[int]] = []
    for round_ in range(14):  # more documents than segments: exercises merging
        doc = [rng.randrange(6) for _ in range(rng.randrange(1, 40))]
        ix.add_document(doc)
        docs.append(doc)
        for _ in range(25):
            if rng.random() < 0.5:  # a context taken from a document, perturbed at its end
                src = rng.choice(docs)
                cut = rng.randrange(0, len(src) + 1)
                context = src[max(0, cut - rng.randrange(0, 10)) : cut]
                if context and rng.random() < 0.3:
                    context[-1] = rng.randrange(6)
            else:
                context = [rng.randrange(6) for _ in range(rng.randrange(0, 10))]
            k = rng.randrange(1, 6)
            got = ix.lookup(context, k)
            want = _brute_force_lookup(docs, context, k, cfg)
            assert (None if got is None else (got.draft, got.match_len, got.cursor)) == want, (
                round_,
                context,
                k,
            )


def test_self_index_finds_earlier_occurrence_only() -> None:
    own = SelfIndex(IndexConfig(min_anchor=1, max_anchor=3))
    own.extend([4, 5, 6, 7])
    assert own.lookup(2) is None  # 7 never occurred before the end
    own.extend([4, 5])
    m = own.lookup(3)
    assert m is not None and m.draft == [6, 7, 4] and m.match_len == 2


# -- CorpusRegistry ---------------------------------------------------------------------------


def encode(text: str) -> list[int]:
    return [ord(c) % 100 for c in text]


def test_registry_add_list_remove_and_budget() -> None:
    reg = CorpusRegistry(max_total_tokens=20, vocab_size=100)
    a = reg.add("a", documents=["hello", "", "abc"], encode=encode)
    assert a.corpus_id == "a" and a.loaded_token_count == 8
    b = reg.add(token_chunks=[[1, 2, SGLANG_SEPARATOR, 3], [4]])
    assert len(b.corpus_id) == 32 and b.loaded_token_count == 4  # generated hex id
    assert reg.get(b.corpus_id).num_documents == 3  # the separator split the first chunk
    assert reg.list() == {"a": 8, b.corpus_id: 4}
    with pytest.raises(CorpusError, match="already exists"):
        reg.add("a", token_chunks=[[1]])
    with pytest.raises(CorpusError, match="budget of 20 tokens"):
        reg.add("c", token_chunks=[list(range(9))])
    assert "c" not in reg.list()  # refused whole
    reg.remove("a")
    reg.remove("never-added")  # SGLang erases silently
    assert reg.add("c", token_chunks=[list(range(9))]).loaded_token_count == 9
    assert set(reg.list()) == {b.corpus_id, "c"}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({}, "exactly one of"),
        ({"documents": ["x"], "token_chunks": [[1]]}, "exactly one of"),
        ({"token_chunks": [[1, "x"]]}, r"token_chunks\[0\]\[1\]"),
        ({"token_chunks": [[1, 100]]}, r"token_chunks\[0\]\[1\].*outside the vocabulary"),
        ({"token_chunks": [[1], 5]}, r"token_chunks\[1\]"),
        ({"documents": "abc"}, "documents: expected a list"),
        ({"documents": ["a", 3]}, r"documents\[1\]"),
        ({"token_chunks": [[]]}, "empty"),
        ({"file_path": "/no/such/file.jsonl"}, "does not exist"),
    ],
)
def test_registry_errors_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    reg = CorpusRegistry(vocab_size=100)
    with pytest.raises(CorpusError, match=field):
        reg.add("x", encode=encode, **kwargs)
    assert reg.list() == {}


def test_registry_reads_jsonl_and_text_files(tmp_path) -> None:
    reg = CorpusRegistry(vocab_size=100)
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps("hi there") + "\n\n" + json.dumps([5, 6, 7]) + "\n")
    assert reg.add("j", file_path=str(jl), encode=encode).loaded_token_count == 11
    assert reg.get("j").num_documents == 2
    txt = tmp_path / "c.txt"
    txt.write_text("line one\nline two")
    assert reg.add("t", file_path=str(txt), encode=encode).loaded_token_count == 17
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"ok"\n{"text": 1}\n')
    with pytest.raises(CorpusError, match="line 2"):
        reg.add("b", file_path=str(bad), encode=encode)


# -- Proposer ---------------------------------------------------------------------------------


@dataclass
class Params:
    custom_params: dict[str, Any] | None = None
    has_penalties: bool = False
    min_new_tokens: int = 0
    max_new_tokens: int | None = 100


@dataclass
class Req:
    rid: str
    input_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    params: Params = field(default_factory=Params)


def _proposer(**cfg: Any) -> Proposer:
    config = SpecConfig(algorithm="NGRAM", num_draft_tokens=5, **cfg)
    return Proposer(config, CorpusRegistry(vocab_size=1000))


def _emit(prop: Proposer, req: Req, truth: list[int]) -> list[int]:
    """One verify step against `truth`: accept the matching draft prefix, then one token."""
    draft = prop.propose([req])[0]
    prop.tick()
    pos = len(req.output_ids)
    accepted = 0
    while accepted < len(draft) and draft[accepted] == truth[pos + accepted]:
        accepted += 1
    prop.on_verified(req, len(draft), accepted)
    req.output_ids += truth[pos : pos + accepted + 1]
    return draft


def test_corpus_drafts_follow_cursor_and_count() -> None:
    prop = _proposer()
    truth = list(range(100, 160))
    prop.registry.add("p0", token_chunks=[truth])
    req = Req("r", [1, 2], [truth[0]], Params(custom_params={CORPUS_FIELD: "p0"}))
    steps = 0
    while len(req.output_ids) < 50:
        _emit(prop, req, truth)
        steps += 1
    st = prop.requests["r"]
    assert st.cursor is not None and st.cursor.source == "corpus"
    assert st.accept_token_num == st.draft_token_num > 0  # the corpus is the truth
    assert steps <= 50 / 4  # ~k + 1 tokens per verify step


def test_bad_drafts_stop_and_probe() -> None:
    prop = _proposer(probe_every=4)
    prop.registry.add("p0", token_chunks=[list(range(600))])  # always proposes x -> x + 1
    truth = list(range(0, 1200, 2))  # but the text goes x -> x + 2, and never repeats
    req = Req("r", [1], [0], Params(custom_params={CORPUS_FIELD: "p0"}))
    drafted = [len(_emit(prop, req, truth)) for _ in range(60)]
    assert drafted[0] == 4  # optimistic start
    tail = drafted[30:]
    assert 0 < sum(1 for d in tail if d) <= len(tail) // 4 + 1  # mostly off, probing
    assert max(tail) <= 1
    assert prop.requests["r"].accept_token_num == 0


def test_batch_gate_one_eager_row_does_not_make_the_batch_draft() -> None:
    """A drafting step is synchronous for the whole batch: it happens when the rows' expected
    accepted tokens reach min_batch_gain per row, or on a probe step — not for one eager row."""
    prop = _proposer(probe_every=16, min_batch_gain=0.25)
    rows = [Req(f"r{i}", [7, 7], [1]) for i in range(16)]
    for r in rows:  # every row has failed its drafts: acceptance estimate below the cost
        for _ in range(12):
            prop.on_verified(r, 1, 0)
    eager = rows[0]
    for _ in range(6):
        prop.on_verified(eager, 4, 4)  # one row whose drafts keep landing
    prop.steps = 3  # not a probe step
    assert not prop.batch_wants_draft(rows)
    assert prop.batch_wants_draft(rows[:1])  # alone, the same row pays for its step
    prop.steps = 16  # a probe step: every row that wants to may draft
    assert prop.batch_wants_draft(rows)
    prop.steps = 15  # ... and asked while the step before it is still in flight
    assert prop.batch_wants_draft(rows, pending=1)
    prop.steps = 3
    for r in rows:
        for _ in range(12):
            prop.on_verified(r, 4, 4)
    assert prop.batch_wants_draft(rows)  # the whole batch repeats itself: draft


def test_measured_step_costs_raise_the_batch_gate() -> None:
    """When drafting steps are measured at 3x a plain step, a batch must expect 2 accepted
    tokens per row to draft; rows at ~1.6 (which pass the 0.25 floor) then decode plainly."""
    from rollout_accel.serving.spec.step_costs import StepCosts

    costs = StepCosts()
    assert costs.break_even_gain() is None
    for _ in range(3):
        costs.observe(True, 0.003)
        costs.observe(False, 0.001)
    assert costs.break_even_gain() == pytest.approx(2.0)
    prop = _proposer(probe_every=16, min_batch_gain=0.25)
    rows = [Req(f"r{i}", [7, 7], [1]) for i in range(8)]
    for r in rows:  # half of each 4-token draft lands: ~1.6 expected accepted tokens
        for _ in range(20):
            prop.on_verified(r, 4, 2)
    prop.steps = 3
    assert prop.batch_wants_draft(rows)  # the static floor alone lets them draft
    prop.costs = costs
    assert not prop.batch_wants_draft(rows)
    prop.steps = 16
    assert prop.batch_wants_draft(rows)  # probe steps still draft (and refresh the costs)


def test_siblings_and_batch_cap_and_ineligible_rows() -> None:
    prop = _proposer(verify_token_budget=8)
    sib = Req("s1", [3, 3, 3], [50, 51, 52, 53, 54, 55])
    prop.on_finished(sib)  # a finished sibling of the same prompt
    req = Req("s2", [3, 3, 3], [50])
    assert prop.propose([req])[0] == [51, 52, 53, 54]
    assert prop.requests["s2"].cursor.source == "siblings"
    other = Req("o", [3, 3, 3], [50], Params(custom_params={GROUP_FIELD: "elsewhere"}))
    assert prop.propose([other])[0] == []  # another group: no siblings, nothing to copy
    four = [Req(f"b{i}", [3, 3, 3], [50]) for i in range(4)]
    assert all(len(d) == 1 for d in prop.propose(four))  # 8 tokens / 4 rows: 1 draft each
    pen = Req("pen", [3, 3, 3], [50], Params(has_penalties=True))
    short = Req("mn", [3, 3, 3], [50], Params(min_new_tokens=5))
    near_end = Req("end", [3, 3, 3], [50], Params(max_new_tokens=3))
    assert prop.propose([pen])[0] == [] and prop.propose([short])[0] == []
    assert prop.propose([near_end])[0] == [51]  # max_new_tokens - 1 - 1 more


def test_self_source_when_no_corpus() -> None:
    prop = _proposer()
    req = Req("r", [9, 8, 7, 6, 5, 4], [9, 8])
    assert prop.propose([req])[0] == [7, 6, 5, 4]
