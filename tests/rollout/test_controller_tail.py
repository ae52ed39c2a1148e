"""Policy v2's tail parts in isolation: the tail pool and the sibling length budget."""

from __future__ import annotations

import math

from rollout_accel.rollout.controller_tail import (
    MIN_PREDICTIONS,
    TailPool,
    sibling_budget,
    sibling_estimate,
)


def test_pool_holds_the_predicted_longest_until_a_long_round() -> None:
    pool: TailPool[float] = TailPool(share=0.25, every=3, length=lambda x: x)
    warm = [float(i) for i in range(MIN_PREDICTIONS - 1)]
    assert pool.admit(warm, step=0, long_round=False) == warm  # too few predictions: nothing pooled
    now = pool.admit([1.0, 5.0, 1000.0, 2000.0], step=0, long_round=False)
    assert now == [1.0, 5.0]
    assert sorted(pool.pool) == [1000.0, 2000.0]
    assert not pool.is_long_round(step=1, provision=10)
    assert pool.is_long_round(step=2, provision=10)  # `every` steps into the run
    assert pool.drain(step=2, count=1) == [2000.0]  # longest first
    assert pool.pool == [1000.0]
    assert not pool.is_long_round(step=3, provision=10)
    assert pool.is_long_round(step=3, provision=1)  # a step's worth is waiting
    assert pool.is_long_round(step=5, provision=10)  # `every` steps since the last one
    # in a long round everything runs now
    assert pool.admit([3000.0], step=4, long_round=True) == [3000.0]


def test_pool_threshold_is_the_share_quantile() -> None:
    pool: TailPool[float] = TailPool(share=0.1, every=4, length=lambda x: x)
    assert pool.threshold() == math.inf
    pool.observe(0, [float(i) for i in range(100)])
    assert pool.threshold() == 90.0
    pool.observe(3, [1000.0] * 20)  # still within the window of `every` = 4 steps
    assert len(pool.recent) == 120
    pool.observe(4, [1000.0] * 20)  # step 0 leaves the window
    assert pool.recent == [1000.0] * 40 and pool.threshold() == 1000.0
    empty: TailPool[float] = TailPool(share=0.0, every=4, length=lambda x: x)
    empty.observe(0, [float(i) for i in range(100)])
    assert empty.threshold() == math.inf


def test_sibling_budget_waits_for_enough_done_siblings() -> None:
    assert sibling_budget([10, 12], 8, factor=2.0, done_share=0.75, floor=4) is None
    assert sibling_budget([10] * 5 + [12], 8, factor=2.0, done_share=0.75, floor=4) == 24
    assert sibling_budget([1] * 6, 8, factor=2.0, done_share=0.75, floor=16) == 16
    assert sibling_budget([10] * 8, 8, factor=2.0, done_share=0.75, floor=4) is None  # all done


def test_sibling_estimate_uses_siblings_and_progress() -> None:
    assert sibling_estimate([30, 50], written=10) == 50.0
    assert sibling_estimate([30], written=40) == 80.0
    assert sibling_estimate([], written=0) == 1.0
