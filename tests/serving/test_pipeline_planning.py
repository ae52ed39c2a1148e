"""Partitions, the latency predictor and the rebalancer (no processes)."""

from __future__ import annotations

import numpy as np
import pytest

from rollout_accel.serving.pipeline.latency import LatencyPredictor, StepFeatures
from rollout_accel.serving.pipeline.partition import (
    counts_of,
    even_bounds,
    parse_partition,
    single_moves,
)
from rollout_accel.serving.pipeline.rebalance import Rebalancer, best_bounds, bottleneck


def test_even_split_and_parse() -> None:
    assert even_bounds(28, 4) == (0, 7, 14, 21, 28)
    assert even_bounds(7, 3) == (0, 2, 4, 7)  # leftovers to the last stages, as SGLang
    assert parse_partition("3,1", 4, 2) == (0, 3, 4)
    with pytest.raises(ValueError, match="pp_partition"):
        parse_partition("2,1", 4, 2)
    with pytest.raises(ValueError, match="pp_size"):
        even_bounds(3, 4)


def test_single_moves_reach_target_keeping_stages_nonempty() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        pp = int(rng.integers(2, 6))
        layers = int(rng.integers(pp, 30))
        a = sorted(rng.choice(np.arange(1, layers), pp - 1, replace=False).tolist())
        b = sorted(rng.choice(np.arange(1, layers), pp - 1, replace=False).tolist())
        current, target = (0, *a, layers), (0, *b, layers)
        bounds = list(current)
        for layer, src, dst in single_moves(current, target):
            assert abs(src - dst) == 1
            assert bounds[src] <= layer < bounds[src + 1]
            if dst == src - 1:
                bounds[src] += 1
            else:
                bounds[dst] -= 1
            assert min(counts_of(tuple(bounds))) >= 1
        assert tuple(bounds) == target


def test_best_bounds_is_optimal_by_brute_force() -> None:
    def stage_time(i: int, n: int) -> float:
        return n * (1.0 + 0.1 * i) + (2.8 if i == 2 else 0.0)

    best = best_bounds(stage_time, 9, 3)
    brute = min(
        ((0, a, b, 9) for a in range(1, 8) for b in range(a + 1, 9)),
        key=lambda bd: bottleneck(stage_time, bd),
    )
    assert bottleneck(stage_time, best) == pytest.approx(bottleneck(stage_time, brute))
    assert counts_of(best)[-1] < 3  # the head's extra work moves layers off the last stage


def test_predictor_learns_linear_costs() -> None:
    pred = LatencyPredictor(2)
    rng = np.random.default_rng(1)
    for _ in range(200):
        f = StepFeatures(
            int(rng.integers(1, 64)), int(rng.integers(10, 4000)), 0, int(rng.integers(1, 64)), 0, 0
        )
        per_layer = 1e-4 + 2e-6 * f.batch + 3e-5 * f.context_tokens / 1e3
        head = 5e-5 + 1e-5 * f.emitting
        for stage in (0, 1):
            pred.observe(stage, f, 2, 2 * per_layer, head if stage == 1 else 0.0)
    f = StepFeatures(32, 2000, 0, 32, 0, 0)
    expect = 3 * (1e-4 + 2e-6 * 32 + 3e-5 * 2) + 5e-5 + 1e-5 * 32
    assert pred.stage_time(1, f, 3) == pytest.approx(expect, rel=1e-3)
    assert pred.report()["mean_rel_error"][1] < 0.05


def test_rebalancer_threshold_and_hysteresis() -> None:
    reb = Rebalancer(8, 2, threshold=0.05, interval=4, window=2)

    def skewed(i: int, n: int) -> float:
        return n + (2.0 if i == 1 else 0.0)

    assert reb.propose(100, (0, 4, 8), skewed) is None  # the predictor warms up first
    assert reb.propose(102, (0, 4, 8), skewed) is None
    assert reb.propose(104, (0, 4, 8), skewed) == (0, 5, 8)
    assert reb.propose(110, (0, 5, 8), skewed) is None  # waiting for the payoff window
    reb.observe(9.0)
    reb.observe(9.0)  # worse than before (measured_before was the prediction, 6): not paid off
    assert reb.threshold == pytest.approx(0.10)
    assert reb.propose(112, (0, 5, 8), skewed) == (0, 4, 8)  # undone once
    assert reb.changes[-1].revert
    reb.observe(9.0)
    reb.observe(9.0)

    def flat(i: int, n: int) -> float:
        return float(n)

    assert reb.propose(140, (0, 4, 8), flat) is None  # already optimal
