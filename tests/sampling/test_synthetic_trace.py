"""SyntheticLongtailTrace: determinism, the published shape, drift, and token overlap."""

from __future__ import annotations

import numpy as np
import pytest

from rollout_accel.sampling import (
    InvalidArgumentError,
    InvalidConfigError,
    SyntheticLongtailTrace,
    trace_statistics,
)


def test_draws_are_deterministic_and_prefix_consistent():
    a = SyntheticLongtailTrace(64, 16, 16384, seed=5)
    b = SyntheticLongtailTrace(64, 16, 16384, seed=5)
    g, h = a.draw_group(7, 3), b.draw_group(7, 3)
    np.testing.assert_array_equal(g.lengths, h.lengths)
    np.testing.assert_array_equal(g.rewards, h.rewards)
    small = a.draw_group(7, 3, n=4)
    np.testing.assert_array_equal(small.lengths, g.lengths[:4])
    assert not np.array_equal(a.draw_group(7, 4).lengths, g.lengths)
    assert not np.array_equal(
        SyntheticLongtailTrace(64, 16, 16384, seed=6).draw_group(7, 3).lengths, g.lengths
    )
    np.testing.assert_array_equal(a.epoch_order(2), b.epoch_order(2))
    assert sorted(a.epoch_order(2)) == list(range(64))


def test_shape_matches_the_published_figures():
    trace = SyntheticLongtailTrace(512, 16, 16384, seed=0, horizon_steps=48)
    stats = trace_statistics(trace, [0, 8, 16, 24, 32, 40], prompts=512, overlap_prompts=2)
    assert 1000 <= stats["median_length"] <= 1350  # TailSieve: 1,160
    assert 3.0 <= stats["p90_over_p50"] <= 4.5  # 3.5
    assert 0.02 <= stats["truncated_share"] <= 0.04  # ~3%
    assert 0.55 <= stats["prompt_variance_share"] <= 0.8  # 64.8%
    assert 0.4 <= stats["zero_variance_share_first"] <= 0.8  # RL-ZVP: 30-99%; effective < 60%
    assert stats["all_wrong_share_first"] > stats["zero_variance_share_first"] / 2
    assert 0.65 <= stats["zero_variance_persistence"] <= 0.95  # GRESO: ~80%
    assert 0.4 <= stats["epoch_3gram_overlap"] <= 0.8  # SPEC-RL: 50-70%


def test_scaled_lengths_and_truncation_rewards():
    trace = SyntheticLongtailTrace(128, 16, 256, seed=0)
    groups = [trace.draw_group(p, 0) for p in range(128)]
    lengths = np.concatenate([g.lengths for g in groups])
    assert lengths.min() >= 1 and lengths.max() <= 256
    assert 12 <= np.median(lengths) <= 24  # 1160 * 256 / 16384 = 18
    for g in groups:
        assert (g.rewards[g.truncated] == 0).all() and (g.lengths[g.truncated] == 256).all()
        assert g.finish_reasons.count("length") == int(g.truncated.sum())


def test_pass_rates_drift_upward_and_tokens_are_reproducible():
    trace = SyntheticLongtailTrace(256, 8, 1024, seed=0, horizon_steps=20)
    start = np.mean([trace.pass_rate(p, 0) for p in range(256)])
    end = np.mean([trace.pass_rate(p, 20) for p in range(256)])
    assert end > start + 0.05
    assert trace.pass_rate(3, 40) == trace.pass_rate(3, 20)  # saturates at the horizon
    r = trace.response_tokens(3, 5, 1, 77)
    assert r.shape == (77,) and r.min() >= 16 and r.max() < trace.config.vocab_size
    np.testing.assert_array_equal(r, trace.response_tokens(3, 5, 1, 77))
    default = trace.response_tokens(3, 5, 1)
    assert default.size == trace.draw_group(3, 5).lengths[1]
    assert trace.prompt_tokens(3).size == trace.prompt_lengths[3]


def test_bad_arguments():
    trace = SyntheticLongtailTrace(8, 4, 256)
    with pytest.raises(InvalidArgumentError, match="out of range"):
        trace.draw_group(8, 0)
    with pytest.raises(InvalidArgumentError, match="n=0"):
        trace.draw_group(1, 0, n=0)
    with pytest.raises(InvalidConfigError, match="max_len"):
        SyntheticLongtailTrace(8, 4, 4)
    with pytest.raises(InvalidConfigError, match="n_per_prompt"):
        SyntheticLongtailTrace(8, 100, 256)
