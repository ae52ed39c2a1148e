"""Speculative decoding in the engine (CPU, fp32): token-identical to plain decoding, in-process
and over HTTP, with the KV of rejected drafts back in the pool."""

from __future__ import annotations

import httpx
import pytest
import torch

from rollout_accel.serving.engine import Engine
from rollout_accel.serving.server import ServerThread
from rollout_accel.serving.spec import CORPUS_FIELD

N_PROMPTS, N_SAMPLES, OUT_LEN = 4, 3, 40


@pytest.fixture(scope="module")
def engine():
    eng = Engine(
        "tiny-qwen3",
        max_running_requests=32,
        speculative_algorithm="NGRAM",
        speculative_num_draft_tokens=5,
        speculative_draft_cost=0.05,
    )
    # A policy that repeats itself: sharper logits at temperature 1 (as after RL training).
    with torch.no_grad():
        eng.model.model.norm.weight.mul_(6.0)
    yield eng
    eng.shutdown()


def _prompts(seed: int = 7) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 400, (12,), generator=gen).tolist() for _ in range(N_PROMPTS)]


def _params(seed: int, extra: dict | None = None, corpus: bool = True) -> list[dict]:
    out = []
    for p in range(N_PROMPTS):
        for s in range(N_SAMPLES):
            params = {
                "max_new_tokens": OUT_LEN,
                "ignore_eos": True,
                "sampling_seed": seed + 100 * p + s,
                **(extra or {}),
            }
            if corpus:
                params["custom_params"] = {CORPUS_FIELD: f"prompt-{p}"}
            out.append(params)
    return out


def _run(engine: Engine, params: list[dict], active: bool, prompt_seed: int = 7) -> list[dict]:
    engine.spec.active = active
    ids = [p for p in _prompts(prompt_seed) for _ in range(N_SAMPLES)]
    return engine.generate(input_ids=ids, sampling_params=params, return_logprob=True)


def _register_history(engine: Engine, extra: dict | None) -> None:
    history = _run(engine, _params(10_000, extra, corpus=False), active=False)
    for p in range(N_PROMPTS):
        engine.spec.registry.remove(f"prompt-{p}")
        chunks = [history[p * N_SAMPLES + s]["output_ids"] for s in range(N_SAMPLES)]
        engine.spec.registry.add(f"prompt-{p}", token_chunks=chunks)


def _assert_same(plain: list[dict], spec: list[dict]) -> None:
    for a, b in zip(plain, spec, strict=True):
        assert a["output_ids"] == b["output_ids"]
        assert a["meta_info"]["finish_reason"] == b["meta_info"]["finish_reason"]
        la = torch.tensor([t[0] for t in a["meta_info"]["output_token_logprobs"]])
        lb = torch.tensor([t[0] for t in b["meta_info"]["output_token_logprobs"]])
        assert torch.allclose(la, lb, atol=1e-4, rtol=1e-4)


def _assert_pool_empty(engine: Engine) -> None:
    assert engine.flush_cache()
    loads = engine.get_loads()
    assert loads["num_used_tokens"] == 0, loads


@pytest.mark.parametrize(
    "extra",
    [
        {"temperature": 0.0},
        {"temperature": 1.0},
        {"temperature": 1.0, "top_p": 0.9, "top_k": 20},
    ],
    ids=["greedy", "t1", "t1-topp-topk"],
)
def test_token_identical_in_process(engine: Engine, extra: dict) -> None:
    _register_history(engine, extra)
    # Drafted run first: finished plain outputs would join the sibling indexes as perfect drafts.
    before = engine.spec.totals.to_dict()
    spec = _run(engine, _params(0, extra), active=True)
    after = engine.spec.totals.to_dict()
    plain = _run(engine, _params(0, extra), active=False)
    _assert_same(plain, spec)
    accepted = after["accepted_tokens"] - before["accepted_tokens"]
    drafted = after["draft_tokens"] - before["draft_tokens"]
    assert 0 < accepted <= drafted  # drafts were verified (greedy history: all accepted)
    metas = [o["meta_info"] for o in spec]
    assert all(m["spec_verify_ct"] >= 1 for m in metas)
    assert sum(m["spec_accept_token_num"] for m in metas) == accepted
    assert sum(m["spec_draft_token_num"] for m in metas) == drafted
    for m in metas:
        assert m["spec_accept_length"] == pytest.approx(
            m["completion_tokens"] / m["spec_verify_ct"]
        )
    steps = after["verify_steps"] - before["verify_steps"]
    assert steps < N_PROMPTS * N_SAMPLES * (OUT_LEN - 1)  # fewer decode steps than tokens
    _assert_pool_empty(engine)


def test_stops_inside_accepted_drafts_and_rows_that_cannot_draft(engine: Engine) -> None:
    """Stop tokens met among accepted drafts end the sequence where plain decoding ends it;
    penalty and min_new_tokens rows share verify batches without drafting."""
    extra = {"temperature": 1.0}
    _register_history(engine, extra)
    probe = _run(engine, _params(0, extra), active=False)
    stop_ids = sorted({o["output_ids"][OUT_LEN // 2] for o in probe})[:3]
    mixed = []
    for i, params in enumerate(_params(0, extra)):
        params = dict(params, ignore_eos=False, stop_token_ids=stop_ids)
        if i % 4 == 1:
            params["repetition_penalty"] = 1.3
        if i % 4 == 2:
            params["min_new_tokens"] = 10
        mixed.append(params)
    spec = _run(engine, mixed, active=True)
    plain = _run(engine, mixed, active=False)
    _assert_same(plain, spec)
    assert any(o["meta_info"]["finish_reason"]["type"] == "stop" for o in spec)
    assert all(
        o["meta_info"]["spec_draft_token_num"] == 0 for o in spec[1::4]
    )  # penalties: no drafts
    _assert_pool_empty(engine)


def test_useless_drafts_are_rejected_freed_and_switched_off(engine: Engine) -> None:
    extra = {"temperature": 1.0}
    gen = torch.Generator().manual_seed(3)
    for p in range(N_PROMPTS):
        engine.spec.registry.remove(f"prompt-{p}")
        noise = torch.randint(3, 400, (6, 60), generator=gen).tolist()
        engine.spec.registry.add(f"prompt-{p}", token_chunks=noise)
    # Fresh prompts: no finished siblings to draft from, only the noise corpus (and self-lookup).
    before = engine.spec.totals.to_dict()
    spec = _run(engine, _params(500, extra), active=True, prompt_seed=99)
    after = engine.spec.totals.to_dict()
    plain = _run(engine, _params(500, extra), active=False, prompt_seed=99)
    _assert_same(plain, spec)
    drafted = after["draft_tokens"] - before["draft_tokens"]
    accepted = after["accepted_tokens"] - before["accepted_tokens"]
    assert drafted > 0 and accepted < 0.5 * drafted
    _assert_pool_empty(engine)


def test_token_identical_over_http(engine: Engine) -> None:
    extra = {"temperature": 1.0, "top_k": 30}
    _register_history(engine, extra)
    chunks = engine.spec.registry  # re-register through the HTTP route instead
    history = {p: chunks.get(f"prompt-{p}") for p in range(N_PROMPTS)}
    assert all(history.values())
    plain = _run(engine, _params(0, extra), active=False)
    engine.spec.active = True
    with ServerThread(engine=engine) as srv, httpx.Client(base_url=srv.url, timeout=120) as http:
        for p in range(N_PROMPTS):
            cid = f"prompt-{p}"
            docs = [o["output_ids"] for o in plain[p * N_SAMPLES : (p + 1) * N_SAMPLES]]
            assert http.post("/remove_external_corpus", json={"corpus_id": cid}).is_success
            r = http.post("/add_external_corpus", json={"corpus_id": cid, "token_chunks": docs})
            assert r.status_code == 200, r.text
        ids = [p for p in _prompts() for _ in range(N_SAMPLES)]
        r = http.post(
            "/generate",
            json={"input_ids": ids, "sampling_params": _params(0, extra), "return_logprob": True},
        )
        assert r.status_code == 200, r.text
        spec = r.json()
    _assert_same(plain, spec)
    # The corpus held these very outputs: nearly every draft token was accepted.
    metas = [o["meta_info"] for o in spec]
    assert sum(m["spec_accept_token_num"] for m in metas) > 0.8 * sum(
        m["spec_draft_token_num"] for m in metas
    )
    assert max(m["spec_accept_length"] for m in metas) > 2.0
    _assert_pool_empty(engine)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"speculative_algorithm": "EAGLE"}, "speculative_algorithm"),
        ({"speculative_algorithm": "NGRAM", "speculative_num_draft_tokens": 1}, "num_draft"),
        ({"speculative_algorithm": "NGRAM", "speculative_draft_cost": 2.0}, "draft_cost"),
    ],
)
def test_bad_speculative_flags_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Engine("tiny-qwen3", **kwargs)


def test_speculation_off_by_default() -> None:
    eng = Engine("tiny-qwen3", max_running_requests=2)
    try:
        assert eng.spec is None
        out = eng.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 3})
        assert not any(k.startswith("spec_") for k in out["meta_info"])
    finally:
        eng.shutdown()


class _EagerGraph:
    """Stands in for a CUDA graph on the CPU: replay runs the captured body eagerly."""

    def __init__(self, owner, bs: int) -> None:
        self.owner, self.bs = owner, bs

    def replay(self) -> None:
        self.owner.outputs[self.bs] = self.owner._body(self.bs)


def test_graph_layout_matches_eager_verify(engine: Engine) -> None:
    """The fixed-stride layout of the verify graphs (padding tokens and rows, slot 0, the spare
    table row) gives the outputs of the packed eager path. Replay is eager here (no GPU)."""
    from rollout_accel.serving.spec.verify_graphs import VerifyGraphs

    class CpuVerifyGraphs(VerifyGraphs):
        def capture(self) -> None:
            self.graphs = {b: _EagerGraph(self, b) for b in self.buckets}

    runner = engine.runner
    extra = {"temperature": 1.0, "top_p": 0.95}
    _register_history(engine, extra)
    spec_eager = _run(engine, _params(40, extra), active=True)
    graphs = CpuVerifyGraphs(runner.model, runner.kv_cache, runner.table, 12, 5)

    class Stub:  # decode graphs "on" (so verify graphs are used), never fitting a batch
        max_bs = 12

        def fits(self, batch_size: int) -> bool:
            return False

    runner.graphs, runner.verify_graphs = Stub(), graphs
    try:
        engine.spec.proposer.groups.clear()
        spec_graph = _run(engine, _params(40, extra), active=True)
    finally:
        runner.graphs = None
        del runner.verify_graphs
    assert graphs.replays > 0
    _assert_same(spec_eager, spec_graph)
    _assert_pool_empty(engine)


def test_overlap_schedule_drafts_only_on_settled_steps() -> None:
    """With overlap on (the GPU default; the same code path on the CPU), steps where no row may
    draft stay overlapped and drafting steps wait for the previous step: outputs unchanged."""
    eng = Engine(
        "tiny-qwen3",
        max_running_requests=32,
        overlap_schedule=True,
        speculative_algorithm="NGRAM",
        speculative_num_draft_tokens=4,
    )
    try:
        with torch.no_grad():
            eng.model.model.norm.weight.mul_(64.0)
        extra = {"temperature": 1.0}
        _register_history(eng, extra)
        eng.spec.proposer.groups.clear()
        batches: list[tuple[int, int]] = []  # (rows, rows with drafts) of each step
        commit = eng.scheduler._commit

        def traced(batch):
            batches.append((len(batch.items), sum(1 for it in batch.items if it.draft)))
            return commit(batch)

        eng.scheduler._commit = traced
        spec = _run(eng, _params(0, extra), active=True)
        spec_steps = len(batches)
        plain = _run(eng, _params(0, extra), active=False)
        _assert_same(plain, spec)
        assert eng.spec.totals.accepted_tokens > 0
        _assert_pool_empty(eng)
        # A verify step is processed before the next is scheduled, so drafts never add steps
        # (a verify step kept "in flight" once hid its rows from the next schedule, which ran
        # the undrafted rest alone: an extra step after every verify step).
        assert any(drafted for _, drafted in batches[:spec_steps])
        assert spec_steps <= len(batches) - spec_steps, (spec_steps, len(batches) - spec_steps)
    finally:
        eng.shutdown()


def test_top_logprob_rows_do_not_draft(engine: Engine) -> None:
    extra = {"temperature": 1.0}
    _register_history(engine, extra)
    engine.spec.active = True
    ids = [p for p in _prompts() for _ in range(N_SAMPLES)]
    kwargs = {"return_logprob": True, "top_logprobs_num": 2}
    spec = engine.generate(input_ids=ids, sampling_params=_params(0, extra), **kwargs)
    engine.spec.active = False
    plain = engine.generate(input_ids=ids, sampling_params=_params(0, extra), **kwargs)
    _assert_same(plain, spec)
    for a, b in zip(plain, spec, strict=True):
        assert b["meta_info"]["spec_draft_token_num"] == 0
        assert a["meta_info"]["output_top_logprobs"] == b["meta_info"]["output_top_logprobs"]
    _assert_pool_empty(engine)
