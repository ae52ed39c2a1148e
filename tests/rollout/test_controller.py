"""The rollout controller on real engines (in-process and over HTTP), every policy."""

from __future__ import annotations

import asyncio
import math

import pytest

from rollout_accel.rollout.controller import GroupSizeError, RolloutController
from rollout_accel.rollout.controller_config import ControllerConfig, ControllerConfigError
from rollout_accel.rollout.pool import EnginePool, HttpEngine, InProcessEngine
from rollout_accel.rollout.prompts import ListPromptSource, PromptItem
from rollout_accel.rollout.rewards import RewardError
from rollout_accel.rollout.sample_types import Sample, Status
from rollout_accel.sampling import AllocatorConfig, HistoryStore, PlannerConfig, RolloutPlanner
from rollout_accel.serving.server import ServerThread

N = 4
LONG, SHORT = 96, 6


def _items(count: int = 48) -> list[PromptItem]:
    return [PromptItem(f"p{i}", [(i * 37) % 500 + 1, 11, (i * 7) % 500 + 2]) for i in range(count)]


def _long_tail_hook(sample: Sample, payload: dict) -> dict:
    """Workload simulation: one sample in every third group is a straggler; lengths via
    ignore_eos (the engine is told, the controller is not)."""
    straggler = sample.group_index % 3 == 0 and sample.index % N == 0
    length = LONG if straggler else SHORT
    params = dict(payload["sampling_params"])
    params["max_new_tokens"] = max(
        1, min(params["max_new_tokens"], length - sample.response_length)
    )
    params["ignore_eos"] = True
    return {**payload, "sampling_params": params}


async def parity_reward(sample: Sample) -> float:
    return float(sample.tokens[-1] % 2 == 0)


def _config(policy: str, **kw) -> ControllerConfig:
    base = dict(
        policy=policy,
        rollout_batch_size=6,
        n_samples_per_prompt=N,
        over_sampling=1.5,
        sampling_params={"temperature": 1.0, "max_new_tokens": LONG},
    )
    base.update(kw)
    return ControllerConfig(**base)


def _controller(engine_handle, policy: str, tmp_path=None, **kw) -> RolloutController:
    planner = None
    if policy == "history":
        store = HistoryStore(tmp_path / "history.db")
        planner = RolloutPlanner(store, PlannerConfig(allocator=AllocatorConfig(fixed_n=N)))
    return RolloutController(
        EnginePool([engine_handle]),
        ListPromptSource(_items(), seed=1),
        parity_reward,
        _config(policy, **kw),
        planner=planner,
        payload_hook=_long_tail_hook,
    )


def _check_group_shapes(groups: list[list[Sample]], target: int) -> None:
    assert len(groups) == target
    for group in groups:
        assert len(group) == N
        assert len({s.metadata["prompt_key"] for s in group}) == 1
        for s in group:
            assert s.status in (Status.COMPLETED, Status.TRUNCATED)
            prompt_len = s.metadata["prompt_length"]
            assert len(s.tokens) == prompt_len + s.response_length
            assert len(s.rollout_log_probs) == s.response_length
            assert len(s.loss_mask) == s.response_length
            assert s.reward in (0.0, 1.0)
            assert s.weight_versions


@pytest.mark.parametrize("policy", ["sync", "dynamic", "partial", "history"])
def test_each_policy_returns_whole_groups(tiny_engine, policy, tmp_path) -> None:
    ctl = _controller(InProcessEngine(tiny_engine), policy, tmp_path)

    async def run() -> list:
        return [await ctl.step(step) for step in range(3)]

    outs = asyncio.run(run())
    for out in outs:
        _check_group_shapes(out.groups, 6)
        if ctl.config.filter_enabled:
            for group in out.groups:
                assert len({s.reward for s in group}) == 2
        assert out.metrics["accel/accepted_groups"] == 6
        assert out.metrics["perf/rollout_time"] > 0
    if policy in ("partial", "history"):
        assert sum(o.metrics["accel/aborted_tokens"] for o in outs) > 0
        assert sum(o.metrics["accel/resumed_tokens"] for o in outs[1:]) > 0
    if policy == "history":
        assert (
            "accel/length_pred_spearman" in outs[-1].metrics
            or outs[-1].metrics["accel/skip_rate"] >= 0
        )
        assert ctl.planner.store.num_groups() > 0


def test_partial_keeps_tokens_and_resumes_exactly(tiny_engine) -> None:
    """Greedy decoding: a sample aborted mid-way and resumed next step ends with exactly the
    tokens an uninterrupted generation of the same length produces."""
    ctl = _controller(
        InProcessEngine(tiny_engine),
        "partial",
        sampling_params={"temperature": 0.0, "max_new_tokens": LONG},
        max_staleness=5,
    )

    async def run():
        first = await ctl.step(0)
        buffered = [s for g in ctl.buffer.groups for s in g.samples if s.status == Status.ABORTED]
        snapshot = {s.index: (list(s.tokens), list(s.rollout_log_probs or [])) for s in buffered}
        later = [await ctl.step(k) for k in range(1, 6)]
        return first, buffered, snapshot, later

    _, buffered, snapshot, later = asyncio.run(run())
    assert buffered, "the long tail should leave aborted samples behind"
    for s in buffered:
        tokens, logprobs = snapshot[s.index]
        assert len(tokens) == s.metadata["prompt_length"] + len(logprobs)
    resumed = [
        s
        for out in later
        for g in out.groups
        for s in g
        if s.index in snapshot and len(s.metadata["segments"]) > 1
    ]
    assert resumed, "some aborted samples should come back in later steps"
    for s in resumed:
        tokens, logprobs = snapshot[s.index]
        assert s.tokens[: len(tokens)] == tokens
        assert s.rollout_log_probs[: len(logprobs)] == logprobs
        prompt = s.tokens[: s.metadata["prompt_length"]]
        ref = tiny_engine.generate(
            input_ids=prompt,
            sampling_params={
                "temperature": 0,
                "max_new_tokens": s.response_length,
                "ignore_eos": True,
            },
        )
        assert s.tokens[len(prompt) :] == ref["output_ids"]
        assert s.response_length == LONG


def test_staleness_bound_and_offpolicy_masks(tiny_engine) -> None:
    ctl = _controller(InProcessEngine(tiny_engine), "partial", max_staleness=1, mask_offpolicy=True)

    async def run():
        return [await ctl.step(k) for k in range(5)]

    outs = asyncio.run(run())
    for step, out in enumerate(outs):
        for group in out.groups:
            for s in group:
                spanned = {seg["rollout_id"] for seg in s.metadata["segments"]}
                assert step - min(spanned) <= 1  # the bound
                last = s.metadata["segments"][-1]["tokens"]
                earlier = s.response_length - last
                if len(s.metadata["segments"]) > 1:
                    assert s.loss_mask == [0] * earlier + [1] * last
                else:
                    assert s.loss_mask == [1] * s.response_length
    assert (
        ctl.buffer.stats.dropped_groups
        + sum(1 for o in outs for g in o.groups for s in g if len(s.metadata["segments"]) > 1)
        > 0
    )


def test_stale_restart_counts(tiny_engine) -> None:
    ctl = _controller(
        InProcessEngine(tiny_engine), "partial", max_staleness=0, stale_action="restart"
    )

    async def run():
        return [await ctl.step(k) for k in range(3)]

    outs = asyncio.run(run())
    assert ctl.buffer.stats.restarted_groups > 0
    for out in outs:
        for group in out.groups:
            for s in group:
                assert len({seg["rollout_id"] for seg in s.metadata["segments"]}) == 1


def test_controller_over_http(tmp_path) -> None:
    with ServerThread(model_path="tiny-qwen3") as srv:
        ctl = _controller(HttpEngine(srv.url), "partial")

        async def run():
            outs = [await ctl.step(k) for k in range(2)]
            await ctl.pool.close()
            return outs

        for out in asyncio.run(run()):
            _check_group_shapes(out.groups, 6)


def test_failed_reward_raises_and_keeps_the_buffer(tiny_engine) -> None:
    calls = {"n": 0}

    async def flaky(sample: Sample) -> float:
        calls["n"] += 1
        if calls["n"] == 10:
            return math.nan
        return float(sample.tokens[-1] % 2 == 0)

    ctl = _controller(InProcessEngine(tiny_engine), "partial")
    ctl.reward = flaky

    async def run():
        with pytest.raises(RewardError, match="nan"):
            await ctl.step(0)
        kept = len(ctl.buffer)
        out = await ctl.step(1)
        return kept, out

    kept, out = asyncio.run(run())
    assert kept > 0
    _check_group_shapes(out.groups, 6)
    # Every group that was generated before the failure is returned or still buffered.
    returned_prompts = {g[0].metadata["prompt_key"] for g in out.groups}
    assert returned_prompts


def test_bad_settings_and_group_sizes(tiny_engine) -> None:
    with pytest.raises(ControllerConfigError, match="policy"):
        ControllerConfig(policy="fastest")
    with pytest.raises(ControllerConfigError, match="over_sampling"):
        ControllerConfig(over_sampling=0.5)
    with pytest.raises(ControllerConfigError, match="bogus"):
        ControllerConfig.from_mapping({"bogus": 1})
    item = PromptItem("x", [1, 2], metadata={"samples": [Sample(tokens=[1, 2])]})
    ctl = RolloutController(
        EnginePool([InProcessEngine(tiny_engine)]),
        ListPromptSource([item]),
        parity_reward,
        _config("sync"),
    )
    with pytest.raises(GroupSizeError, match="n_samples_per_prompt"):
        asyncio.run(ctl.step(0))


def test_filter_that_rejects_everything_fails_clearly(tiny_engine) -> None:
    from rollout_accel.rollout.controller import FilterStarvedError

    async def constant(sample: Sample) -> float:
        return 1.0  # every group is zero-variance: DAPO's filter keeps none

    ctl = RolloutController(
        EnginePool([InProcessEngine(tiny_engine)]),
        ListPromptSource(_items(), seed=1),
        constant,
        _config("dynamic", max_candidates_factor=1.0),
        payload_hook=_long_tail_hook,
    )
    with pytest.raises(FilterStarvedError, match="kept 0 of 6"):
        asyncio.run(ctl.step(0))
