"""DraftIndex: longest-suffix matching, voting, siblings, history corpus, SGLang export."""

from __future__ import annotations

import numpy as np
import pytest

from rollout_accel.sampling import (
    DraftConfig,
    DraftIndex,
    HistoryConfig,
    HistoryStore,
    InvalidArgumentError,
    InvalidConfigError,
    SyntheticLongtailTrace,
    corpus_request,
)
from rollout_accel.sampling.evaluation import _Acceptance


def test_proposes_the_continuation_of_the_longest_matching_suffix():
    d = DraftIndex()
    d.add_response("p", [1, 2, 3, 4, 5, 6])
    d.add_response("p", [9, 8, 3, 4, 70, 71])
    # "3 4" occurs twice; the longer context "2 3 4" picks the first response.
    assert d.propose("p", [1, 2, 3, 4], 3) == [5, 6]
    assert d.propose("p", [7, 8, 3, 4], 3) == [70, 71]
    assert d.propose("p", [3, 4], 1) == [70]  # a tie goes to the most recent occurrence
    assert d.propose("p", [], 2) == [9, 8]  # nothing generated yet: earlier responses' starts
    assert d.propose("p", [9], 2) == [8, 3]
    assert d.propose("p", [55, 56], 4) == []
    assert d.propose("p", [1, 2], 0) == []
    assert d.propose("unknown", [1, 2], 4) == []


def test_majority_vote_across_occurrences():
    d = DraftIndex()
    for tail in ([10, 11], [10, 11], [20, 21]):
        d.add_response(1, [5, 6, *tail])
    assert d.propose(1, [5, 6], 2) == [10, 11]


def test_corpus_comes_from_history_and_refreshes(tmp_path, make_group):
    cfg = HistoryConfig(max_responses_per_prompt=2)
    with HistoryStore(tmp_path / "h.db", cfg) as store:
        store.record_groups(0, [make_group(1, [1.0, 0.0], responses=[[1, 2, 3], [4, 5, 6]])])
        d = DraftIndex(store)
        assert d.propose(1, [1, 2], 2) == [3]
        store.record_groups(1, [make_group(1, [1.0, 0.0], responses=[[7, 8, 9], [1, 2, 30]])])
        assert d.propose(1, [1, 2], 1) == [3]  # cached until forgotten
        d.forget([1])
        assert [r.tolist() for r in d.corpus(1)] == [[7, 8, 9], [1, 2, 30]]
        assert d.propose(1, [1, 2], 1) == [30]
        d.add_response(2, [11, 12])
        chunks = d.token_chunks()
        assert chunks == [[7, 8, 9], [1, 2, 30], [11, 12]]
        assert d.token_chunks(max_tokens=4) == [[7, 8, 9]]
        body = corpus_request("history-step-1", chunks)
        assert body == {"corpus_id": "history-step-1", "token_chunks": chunks}


def test_acceptance_on_later_epochs_of_the_synthetic_trace(tmp_path, make_group):
    trace = SyntheticLongtailTrace(6, 4, 1024, seed=1, horizon_steps=64)
    d = DraftIndex()
    for p in range(6):
        for j in range(4):
            r = trace.response_tokens(p, 0, j, 200)
            d.add_response(p, r)
    acc = _Acceptance()
    for p in range(6):
        acc.replay(lambda gen, p=p: d.propose(p, gen, 8), trace.response_tokens(p, 16, 0, 200))
    assert acc.per_step() > 1.5  # > 1 token per verification step means drafts were accepted
    assert acc.per_proposal() > 1.0


def test_bad_arguments():
    d = DraftIndex()
    with pytest.raises(InvalidArgumentError, match="k=-1"):
        d.propose(1, [1], -1)
    with pytest.raises(InvalidArgumentError, match="1-D sequence"):
        d.add_response(1, [[1, 2]])
    with pytest.raises(InvalidArgumentError, match="negative token"):
        d.add_response(1, [1, -2])
    d.add_response(1, [1, 2, 3])
    with pytest.raises(InvalidArgumentError, match="generated"):
        d.propose(1, np.array([1.5, 2.5]), 2)
    with pytest.raises(InvalidArgumentError, match="corpus_id"):
        corpus_request("", [])
    with pytest.raises(InvalidConfigError):
        DraftConfig(anchor=0)
