"""SampleAllocator: value model, budgets, fixed-n mode, optimality on a small instance."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from rollout_accel.sampling import (
    AllocatorConfig,
    Budget,
    InvalidArgumentError,
    InvalidConfigError,
    SampleAllocator,
)
from rollout_accel.sampling.allocator import beta_power_means, zero_variance_probability


def test_beta_power_means_match_monte_carlo():
    rng = np.random.default_rng(0)
    p = rng.beta(2.0, 5.0, 400_000)
    exact = beta_power_means(np.array([2.0]), np.array([5.0]), 6)[0]
    mc = [np.mean(p**k) for k in range(7)]
    np.testing.assert_allclose(exact, mc, rtol=0.02)
    # A confident posterior reproduces the plug-in value 1 - p^n - (1-p)^n.
    a, b = np.array([3e4]), np.array([7e4])
    v = 1 - beta_power_means(a, b, 8)[0, 8] - beta_power_means(b, a, 8)[0, 8]
    assert v == pytest.approx(1 - zero_variance_probability(0.3, 8), abs=1e-3)


def _history(store, make_group):
    # 1: all wrong three times; 2: half right; 3: all right three times.
    for step in range(3):
        store.record_groups(
            step,
            [
                make_group(1, [0.0] * 8),
                make_group(2, [1.0, 0.0] * 4),
                make_group(3, [1.0] * 8),
            ],
        )


def test_value_drives_entry_and_extra_samples(store, make_group):
    _history(store, make_group)
    alloc = SampleAllocator(store, AllocatorConfig(min_n=2, max_n=16))
    # Tight budget: only the mixed prompt (high chance of a mixed group with 2 samples) enters.
    tight = alloc.allocate([1, 2, 3], [100.0] * 3, Budget(samples=2))
    assert tight.counts == {2: 2} and tight.deferred == [1, 3]
    # Loose budget: the mixed prompt saturates quickly (1 - 2 * 0.5^n); the near-certain ones
    # need many samples for a chance of a mixed group, so they get more (as in Knapsack RL).
    out = alloc.allocate([1, 2, 3], [100.0] * 3, Budget(samples=24))
    assert out.total_samples == 24
    assert out.counts[1] > out.counts[2] and out.counts[3] > out.counts[2]
    assert all(2 <= n <= 16 for n in out.counts.values())
    assert out.pass_rates[1] < out.pass_rates[2] < out.pass_rates[3]
    assert out.expected_tokens == pytest.approx(100.0 * out.total_samples)
    assert tight.expected_effective_groups < out.expected_effective_groups


def test_token_budget_prefers_cheaper_prompts(store, make_group):
    store.record_groups(0, [make_group(k, [1.0, 0.0] * 4) for k in (1, 2)])
    alloc = SampleAllocator(store, AllocatorConfig(min_n=2, max_n=32))
    out = alloc.allocate([1, 2], [1000.0, 100.0], Budget(tokens=5000))
    assert out.counts[2] > out.counts.get(1, 0)
    assert out.expected_tokens <= 5000


def test_fixed_n_mode_only_chooses_prompts(store, make_group):
    _history(store, make_group)
    alloc = SampleAllocator(store, AllocatorConfig(fixed_n=8))
    out = alloc.allocate([1, 2, 3, 4], [100.0] * 4, Budget(groups=2))
    assert set(out.counts.values()) == {8}
    # The mixed prompt and the unknown one beat the two zero-variance ones.
    assert set(out.counts) == {2, 4} and out.deferred == [1, 3]
    out = alloc.allocate([1, 2, 3, 4], [100.0] * 4, Budget(groups=2), required={3})
    assert 3 in out.counts and len(out.counts) == 2


def test_greedy_is_within_one_entry_of_brute_force(store, make_group):
    store.record_groups(
        0,
        [
            make_group(1, [1.0, 0.0, 0.0, 0.0]),
            make_group(2, [1.0, 1.0, 0.0, 1.0]),
            make_group(3, [0.0] * 4),
        ],
    )
    alloc = SampleAllocator(store, AllocatorConfig(min_n=1, max_n=6))
    keys = [1, 2, 3]
    stats = store.prompt_stats(keys)
    v, _ = alloc.values(keys, stats, 6, store.global_stats().pass_rate)
    for budget in range(2, 19):
        out = alloc.allocate(keys, [1.0] * 3, Budget(samples=budget))
        best = max(
            sum(v[i, n] for i, n in enumerate(ns))
            for ns in itertools.product(range(7), repeat=3)
            if sum(ns) <= budget
        )
        got = out.expected_effective_groups
        assert got <= best + 1e-12
        # Greedy on the concave envelope stops only at an entry that did not fit (2 samples).
        assert best - got <= v[:, 2].max() + 1e-12
        assert out.total_samples >= min(budget - 1, 18)
        assert all(n >= 2 for n in out.counts.values())  # one sample never has variance
    full = alloc.allocate(keys, [1.0] * 3, Budget(samples=18))
    assert full.counts == {1: 6, 2: 6, 3: 6}


def test_bad_arguments(store):
    alloc = SampleAllocator(store)
    with pytest.raises(InvalidArgumentError, match="unique"):
        alloc.allocate([1, 1], [1.0, 1.0], Budget(samples=4))
    with pytest.raises(InvalidArgumentError, match="expected_lengths has shape"):
        alloc.allocate([1, 2], [1.0], Budget(samples=4))
    with pytest.raises(InvalidArgumentError, match="finite and > 0"):
        alloc.allocate([1], [float("nan")], Budget(samples=4))
    with pytest.raises(InvalidArgumentError, match="at least one"):
        Budget()
    with pytest.raises(InvalidArgumentError, match="Budget.samples"):
        Budget(samples=-1)
    with pytest.raises(InvalidConfigError, match="min_n <= max_n"):
        AllocatorConfig(min_n=8, max_n=4)
    assert alloc.allocate([], [], Budget(samples=4)).counts == {}
