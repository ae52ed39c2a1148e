"""Policy v2 on a real in-process engine: the max-of-n tail budget, tail batching, the drafts
hook, placement by predicted length and KV-fitted concurrency."""

from __future__ import annotations

import asyncio

import pytest

from rollout_accel.rollout.controller import RolloutController
from rollout_accel.rollout.controller_config import ControllerConfig, ControllerConfigError
from rollout_accel.rollout.pool import EnginePool, InProcessEngine
from rollout_accel.rollout.pool.base import supports_drafts
from rollout_accel.rollout.prompts import ListPromptSource, PromptItem
from rollout_accel.rollout.sample_types import Sample, Status
from rollout_accel.sampling import AllocatorConfig, HistoryStore, PlannerConfig, RolloutPlanner

N = 4
LONG, SHORT = 200, 6


def _items(count: int = 64) -> list[PromptItem]:
    # prompt lengths 3..10: the first-epoch length prior has something to regress on
    return [
        PromptItem(f"p{i}", [(i * 37 + j) % 500 + 1 for j in range(3 + i % 8)])
        for i in range(count)
    ]


def _straggler_hook(sample: Sample, payload: dict) -> dict:
    """One straggler per group (sample 0 runs LONG tokens, its siblings SHORT)."""
    length = LONG if sample.metadata["index_in_group"] == 0 else SHORT
    params = dict(payload["sampling_params"])
    params["max_new_tokens"] = max(
        1, min(params["max_new_tokens"], length - sample.response_length)
    )
    params["ignore_eos"] = True
    return {**payload, "sampling_params": params}


async def one_reward(sample: Sample) -> float:
    return float(sample.index % 2)


def _controller(engine, policy: str, tmp_path, hook=_straggler_hook, **kw) -> RolloutController:
    planner = None
    if policy == "history":
        planner = RolloutPlanner(
            HistoryStore(tmp_path / "h.db"), PlannerConfig(allocator=AllocatorConfig(fixed_n=N))
        )
    cfg = ControllerConfig(
        policy=policy,
        rollout_batch_size=4,
        n_samples_per_prompt=N,
        sampling_params={"temperature": 1.0, "max_new_tokens": LONG},
        **kw,
    )
    return RolloutController(
        EnginePool([InProcessEngine(engine)]),
        ListPromptSource(_items(), seed=0),
        one_reward,
        cfg,
        planner=planner,
        payload_hook=hook,
    )


@pytest.mark.parametrize("cut", ["truncate", "mask"])
def test_tail_budget_cuts_the_straggler_as_truncation(tiny_engine, tmp_path, cut) -> None:
    ctl = _controller(
        tiny_engine, "sync", tmp_path, tail_budget=2.0, tail_budget_min=8, tail_cut=cut
    )
    out = asyncio.run(ctl.step(0))
    assert out.metrics["accel/tail_cut_samples"] == 4  # one per group
    for group in out.groups:
        straggler = next(s for s in group if s.metadata["index_in_group"] == 0)
        assert straggler.status == Status.TRUNCATED and straggler.metadata["tail_cut"]
        # budget = max(2 x 6, 8) = 12 tokens; aborted mid-flight, so possibly a few past it
        assert 12 <= straggler.response_length < LONG
        assert len(straggler.rollout_log_probs) == straggler.response_length
        assert straggler.loss_mask == [0 if cut == "mask" else 1] * straggler.response_length
        for s in group:
            if s is not straggler:
                # (the hook's max_new_tokens ends them with "length": not a budget cut)
                assert s.response_length == SHORT and not s.metadata.get("tail_cut")


def test_without_tail_budget_the_group_waits_for_its_straggler(tiny_engine, tmp_path) -> None:
    ctl = _controller(tiny_engine, "sync", tmp_path)
    out = asyncio.run(ctl.step(0))
    assert out.metrics["accel/tail_cut_samples"] == 0
    assert all(
        s.response_length == LONG
        for g in out.groups
        for s in g
        if s.metadata["index_in_group"] == 0
    )


def test_history_pools_predicted_long_prompts_for_a_long_round(tiny_engine, tmp_path) -> None:
    """Prompt length predicts response length here: the pool holds the longest-predicted new
    prompts and a long round runs them; every step still returns whole groups."""

    def by_prompt_length(sample: Sample, payload: dict) -> dict:
        length = 4 * sample.metadata["prompt_length"]
        params = dict(payload["sampling_params"])
        params["max_new_tokens"] = max(
            1, min(params["max_new_tokens"], length - sample.response_length)
        )
        params["ignore_eos"] = True
        return {**payload, "sampling_params": params}

    ctl = _controller(tiny_engine, "history", tmp_path, hook=by_prompt_length, tail_round_every=5)

    async def run() -> list:
        return [await ctl.step(k) for k in range(9)]

    outs = asyncio.run(run())
    assert all(len(o.groups) == 4 for o in outs)
    assert max(o.metrics["accel/tail_pool"] for o in outs) > 0
    long_rounds = [k for k, o in enumerate(outs) if o.metrics["accel/long_round"]]
    assert long_rounds, "a long round must come within tail_round_every steps of pooling"

    # the long round runs the pooled (longest-predicted) prompts: its groups are the longest
    def prompt_lengths(o) -> list[int]:
        return [g[0].metadata["prompt_length"] for g in o.groups]

    k = long_rounds[0]
    short = [x for j, o in enumerate(outs) if j not in long_rounds for x in prompt_lengths(o)]
    assert sum(prompt_lengths(outs[k])) / 4 > sum(short) / len(short)
    assert all(o.metrics["accel/deferred_prompts"] >= o.metrics["accel/tail_pool"] for o in outs)


def test_drafts_hook_passes_the_prompt_corpus_key(tiny_engine, tmp_path) -> None:
    seen: list[dict] = []

    def record(sample: Sample, payload: dict) -> dict:
        seen.append(payload)
        return _straggler_hook(sample, payload)

    ctl = _controller(tiny_engine, "sync", tmp_path, hook=record, drafts=True)
    out = asyncio.run(ctl.step(0))
    assert len(out.groups) == 4 and seen
    for payload in seen:
        key = payload["rid"] and payload["sampling_params"]["custom_params"]["spec_corpus_id"]
        assert key.startswith("prompt:p")
    off = _controller(tiny_engine, "sync", tmp_path, hook=record)
    seen.clear()
    asyncio.run(off.step(0))
    assert all("custom_params" not in p["sampling_params"] for p in seen)
    # the in-process engine has no speculative decoding (yet): the bench refuses --drafts
    assert not supports_drafts(InProcessEngine(tiny_engine))


def test_kv_fitted_concurrency_and_abort_by_rid(tiny_engine) -> None:
    pool = EnginePool([InProcessEngine(tiny_engine)], concurrency_per_engine=512)
    capacity = tiny_engine.server_info()["max_total_num_tokens"]

    async def run() -> None:
        await pool.fit_concurrency_to_kv(capacity / 10)
        # 0.9 of the KV budget at 1/10 of it per request (9, or 8 with float rounding)
        assert pool.engines[0].limit in (8, 9)
        await pool.fit_concurrency_to_kv(capacity * 2)
        assert pool.engines[0].limit == 1  # at least one request in flight
        await pool.fit_concurrency_to_kv(1.0)
        assert pool.engines[0].limit == 512  # never above the configured bound
        assert await pool.abort_request("no-such-request")  # unknown rid: answered, no error
        with pytest.raises(ValueError, match="tokens_per_request"):
            await pool.fit_concurrency_to_kv(0)

    asyncio.run(run())


def test_v2_settings_are_validated_by_name() -> None:
    with pytest.raises(ControllerConfigError, match="tail_budget"):
        ControllerConfig(tail_budget=0.5)
    with pytest.raises(ControllerConfigError, match="tail_cut"):
        ControllerConfig(tail_cut="drop")
    with pytest.raises(ControllerConfigError, match="explore_floor"):
        ControllerConfig(explore_floor=1.5)
    assert ControllerConfig(policy="history").batches_tail
    assert not ControllerConfig(policy="partial").batches_tail
    assert not ControllerConfig(policy="history", tail_batching=False).batches_tail
    assert not ControllerConfig(policy="history").finishes_stale
    assert ControllerConfig(policy="history", tail_budget=2.0).finishes_stale
    assert not ControllerConfig(policy="partial", tail_budget=2.0).finishes_stale


def _every_third_straggles(sample: Sample, payload: dict) -> dict:
    straggler = sample.group_index % 3 == 0 and sample.metadata["index_in_group"] == 0
    length = LONG if straggler else SHORT
    params = dict(payload["sampling_params"])
    params["max_new_tokens"] = max(
        1, min(params["max_new_tokens"], length - sample.response_length)
    )
    params["ignore_eos"] = True
    return {**payload, "sampling_params": params}


@pytest.mark.parametrize("finish_stale", [True, False])
def test_finish_stale_keeps_the_bound_without_dropping(tiny_engine, tmp_path, finish_stale) -> None:
    ctl = _controller(
        tiny_engine,
        "history",
        tmp_path,
        hook=_every_third_straggles,
        finish_stale=finish_stale,
        tail_batching=False,
    )

    async def run() -> list:
        return [await ctl.step(k) for k in range(5)]

    outs = asyncio.run(run())
    for k, out in enumerate(outs):
        assert len(out.groups) == 4
        for group in out.groups:  # every returned sample within the staleness bound
            starts = [s.metadata["start_rollout_id"] for s in group]
            assert k - min(starts) <= ctl.config.max_staleness
    dropped = outs[-1].metrics["accel/stale_dropped_groups"]
    finished = sum(o.metrics["accel/stale_finished_groups"] for o in outs)
    if finish_stale:
        assert dropped == 0 and finished > 0
    else:
        assert dropped > 0 and finished == 0


def test_placement_by_predicted_tokens_over_two_engines(tiny_engine, tmp_path) -> None:
    """history passes the pool its predicted tokens (not the cap) as each request's cost, so
    groups spread over the engines by predicted work."""
    pool = EnginePool(
        [InProcessEngine(tiny_engine, name="a"), InProcessEngine(tiny_engine, name="b")]
    )
    costs: list[int] = []
    generate = pool.generate

    async def recording(payload, group_key=None, cost=1):
        costs.append(cost)
        return await generate(payload, group_key=group_key, cost=cost)

    pool.generate = recording  # type: ignore[method-assign]
    ctl = _controller(tiny_engine, "history", tmp_path, hook=_every_third_straggles)
    ctl.pool = pool

    async def run() -> list:
        return [await ctl.step(k) for k in range(3)]

    outs = asyncio.run(run())
    engines = {s.engine for o in outs for s in o.spans}
    assert engines == {"a", "b"}
    # later steps have predictions: costs well below prompt + the cap
    assert min(costs) < LONG
    assert all(len(o.groups) == 4 for o in outs)
