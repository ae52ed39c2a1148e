"""LengthPredictor: history beats prior, cold-start prior, clipping, and rank quality."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rollout_accel.sampling import (
    GroupRecord,
    HistoryStore,
    InvalidArgumentError,
    LengthConfig,
    LengthPredictor,
    SyntheticLongtailTrace,
    longest_first,
)
from rollout_accel.sampling.evaluation import spearman


def test_history_orders_prompts_and_upper_exceeds_mean(store, make_group):
    store.record_groups(
        0,
        [
            make_group(1, [1.0, 0.0] * 4, [2000, 2500, 1800, 3000] * 2),
            make_group(2, [1.0, 0.0] * 4, [100, 120, 90, 150] * 2),
        ],
    )
    pred = LengthPredictor(store)
    long, short = pred.predict([1, 2])
    assert long.from_history and short.from_history
    assert long.mean > 1000 and short.mean < 300
    assert long.upper > long.mean and short.upper > short.mean
    assert longest_first([short, long]) == [1, 2]
    assert longest_first([short, long], by="mean") == [1, 2]


def test_cold_start_prior_uses_prompt_length(store, make_group):
    rng = np.random.default_rng(0)
    groups = []
    for k in range(60):
        plen = int(rng.integers(20, 2000))
        lengths = [max(1, int(plen * 3 * f)) for f in rng.uniform(0.7, 1.3, 8)]
        groups.append(make_group(k, [1.0, 0.0] * 4, lengths, prompt_length=plen))
    store.record_groups(0, groups)
    pred = LengthPredictor(store)
    small, big, unknown = pred.predict(["new-a", "new-b", "new-c"], [30, 1500, None])
    assert not small.from_history
    assert big.mean > 5 * small.mean
    assert small.mean < unknown.mean < big.mean
    with pytest.raises(InvalidArgumentError, match="prompt_lengths for 2 keys"):
        pred.predict([1, 2], [10])
    with pytest.raises(InvalidArgumentError, match="must be an int >= 0"):
        pred.predict([1], [-5])


def test_empty_store_uses_the_default_and_clips_to_max_len(store):
    (est,) = LengthPredictor(store, LengthConfig(default_median=500.0)).predict(["x"])
    assert est.log_mean == pytest.approx(math.log(500.0))
    (capped,) = LengthPredictor(store, LengthConfig(max_len=256)).predict(["x"])
    assert capped.upper == 256 and capped.mean <= 256


def test_rank_correlation_on_held_out_steps(tmp_path):
    trace = SyntheticLongtailTrace(200, 8, 4096, seed=3, horizon_steps=30)
    with HistoryStore(tmp_path / "h.db") as store:
        for step in (0, 10):
            records = []
            for p in range(200):
                g = trace.draw_group(p, step)
                records.append(
                    GroupRecord(p, g.rewards, g.lengths, prompt_length=int(trace.prompt_lengths[p]))
                )
            store.record_groups(step, records)
        est = LengthPredictor(store).predict(range(200))
        actual = [trace.draw_group(p, 20).lengths.mean() for p in range(200)]
    assert spearman(np.array([e.mean for e in est]), np.array(actual)) > 0.6
