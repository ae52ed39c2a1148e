"""RolloutPlanner: one step's plan as the controller sees it."""

from __future__ import annotations

import numpy as np
import pytest

from rollout_accel.sampling import (
    AllocatorConfig,
    Budget,
    InvalidArgumentError,
    PlannerConfig,
    Reason,
    RolloutPlanner,
    SelectorConfig,
)

PASS, FAIL, MIXED = [1.0] * 4, [0.0] * 4, [1.0, 0.0, 1.0, 0.0]


def test_plan_partitions_candidates_and_orders_longest_first(store, make_group):
    store.record_groups(
        0,
        [make_group(k, MIXED, [50 * (k + 1)] * 4) for k in range(10)]
        + [make_group(k, FAIL) for k in range(10, 20)],
    )
    cfg = PlannerConfig(
        selector=SelectorConfig(explore_init=0.0, explore_min=0.0),
        allocator=AllocatorConfig(fixed_n=8),
    )
    planner = RolloutPlanner(store, cfg)
    cands = list(range(25))
    plan = planner.plan(cands, None, 1, Budget(groups=12), np.random.default_rng(0))
    rolled = [i.key for i in plan.items]
    assert sorted(rolled + plan.skipped + plan.deferred) == cands
    assert set(plan.skipped) == set(range(10, 20))
    assert len(rolled) == 12 and all(i.n == 8 for i in plan.items)
    uppers = [i.upper_length for i in plan.items]
    assert uppers == sorted(uppers, reverse=True)
    assert plan.reasons["skip"] == 10 and plan.reasons["new"] == 5
    assert store.stats(10).skips_since_rollout == 1  # skips were recorded
    assert plan.metrics()["planned_samples"] == 96


def test_record_adapts_exploration(store, make_group):
    planner = RolloutPlanner(store, PlannerConfig(selector=SelectorConfig(explore_step=0.1)))
    before = planner.selector.state.explore
    outcomes = planner.record(0, [make_group(k, FAIL) for k in range(8)])
    assert all(o.zero_variance for o in outcomes)
    assert planner.selector.state.explore == pytest.approx(before - 0.1)
    assert store.get_state("selector")["explore"] == pytest.approx(before - 0.1)


def test_a_prompt_deferred_repeatedly_gets_budget(store, make_group):
    # Prompt 0 looks worthless (all right, long); prompts 1.. are mixed and short.
    store.record_groups(0, [make_group(0, PASS, [5000] * 4)])
    store.record_groups(1, [make_group(k, MIXED, [50] * 4) for k in range(1, 40)])
    cfg = PlannerConfig(skip=False, allocator=AllocatorConfig(fixed_n=4), max_deferrals=2)
    planner = RolloutPlanner(store, cfg)
    rng = np.random.default_rng(0)
    got = []
    for step in range(2, 6):
        plan = planner.plan([0, step, step + 10], None, step, Budget(groups=1), rng)
        got.append([i.key for i in plan.items])
    assert got[0] == [2] and got[1] == [3]  # deferred twice...
    assert got[2] == [0]  # ...then served first
    assert all(i.reason is not Reason.SKIP for i in plan.items)


def test_plan_rejects_bad_arguments(store):
    planner = RolloutPlanner(store)
    rng = np.random.default_rng(0)
    with pytest.raises(InvalidArgumentError, match="unique"):
        planner.plan([1, 1], None, 0, Budget(groups=1), rng)
    with pytest.raises(InvalidArgumentError, match="prompt_lengths"):
        planner.plan([1, 2], [10], 0, Budget(groups=1), rng)


def test_required_candidates_get_budget_first(store, make_group):
    """The caller's exploration floor: required prompts run even when priced out."""
    # 0..9 short and mixed (cheap, valuable); 10..19 very long (priced out by value per token)
    store.record_groups(
        0,
        [make_group(k, MIXED, [10] * 4) for k in range(10)]
        + [make_group(k, MIXED, [4000] * 4) for k in range(10, 20)],
    )
    planner = RolloutPlanner(store, PlannerConfig(skip=False, allocator=AllocatorConfig(fixed_n=4)))
    rng = np.random.default_rng(0)
    free = planner.plan(list(range(20)), None, 1, Budget(groups=5), rng)
    assert all(i.key < 10 for i in free.items)
    floor = planner.plan(list(range(20)), None, 2, Budget(groups=5), rng, required=[15, 16])
    assert {15, 16} <= {i.key for i in floor.items}
    assert len(floor.items) == 5
