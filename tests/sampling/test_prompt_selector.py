"""PromptSelector on constructed histories: skip by streak, explore, no starvation, flip back."""

from __future__ import annotations

import numpy as np
import pytest

from rollout_accel.sampling import (
    GroupOutcome,
    HistoryStore,
    InvalidConfigError,
    PromptSelector,
    Reason,
    SelectorConfig,
)

PASS, FAIL, MIXED = [1.0] * 4, [0.0] * 4, [1.0, 0.0, 1.0, 0.0]
NEVER_EXPLORE = SelectorConfig(explore_init=0.0, explore_min=0.0, explore_max=0.0)


def _reasons(sel: PromptSelector, keys: list[object], step: int, seed: int = 0) -> list[Reason]:
    return [d.reason for d in sel.select(keys, step, np.random.default_rng(seed)).decisions]


def test_reasons_for_new_mixed_and_zero_variance_prompts(store, make_group):
    store.record_groups(0, [make_group(1, MIXED), make_group(2, FAIL), make_group(3, PASS)])
    sel = PromptSelector(store, NEVER_EXPLORE)
    result = sel.select([1, 2, 3, 4], 1, np.random.default_rng(0))
    assert [d.reason for d in result.decisions] == [
        Reason.EFFECTIVE,
        Reason.SKIP,
        Reason.SKIP,
        Reason.NEW,
    ]
    assert result.selected == [1, 4] and result.skipped == [2, 3]
    assert result.counts()["skip"] == 2 and result.counts()["new"] == 1


def test_keep_probability_is_explore_to_the_streak(store, make_group):
    for step in range(3):
        store.record_groups(step, [make_group(1, FAIL)] + ([make_group(2, FAIL)] if step else []))
    sel = PromptSelector(store, SelectorConfig(explore_init=0.5))
    p1, r1 = sel.keep_probability(store.stats(1))
    p2, _ = sel.keep_probability(store.stats(2))
    assert (p1, r1, p2) == (0.125, Reason.EXPLORE, 0.25)
    rng = np.random.default_rng(1)
    kept = sum(sel.select([1, 2], 3, rng).decisions[0].keep for _ in range(4000))
    assert kept / 4000 == pytest.approx(0.125, abs=0.02)


def test_no_prompt_is_starved(store, make_group):
    cfg = SelectorConfig(
        explore_init=0.0, explore_min=0.0, max_consecutive_skips=2, skip_backoff=2.0
    )
    store.record_groups(0, [make_group(1, FAIL)])
    sel = PromptSelector(store, cfg)
    step = 1
    rolled_at = []
    for _ in range(12):  # twelve epochs, the prompt always all-wrong
        result = sel.select([1], step, np.random.default_rng(step))
        if result.skipped:
            store.record_skips(step, result.skipped)
        else:
            assert result.decisions[0].reason is Reason.FORCED
            store.record_groups(step, [make_group(1, FAIL)])
            rolled_at.append(step)
        step += 1
    # Bound 2 after one zero-variance group, then 4, then 8: exponential backoff, never forever.
    assert rolled_at == [3, 8]
    assert sel.skip_bound(1) == 2 and sel.skip_bound(3) == 8 and sel.skip_bound(10) == 12


def test_prompt_that_flips_from_all_wrong_to_mixed_comes_back(store, make_group):
    sel = PromptSelector(store, SelectorConfig(explore_init=0.0, explore_min=0.0))
    for step in range(3):
        store.record_groups(step, [make_group(9, FAIL)])
    assert _reasons(sel, [9], 3) == [Reason.SKIP]
    store.record_skips(3, [9])
    # The starvation guard (or an exploration draw) rolls it out again; now it is mixed.
    store.record_groups(4, [make_group(9, [0.0, 1.0, 0.0, 0.0])])
    for step in range(5, 25):
        assert _reasons(sel, [9], step, seed=step) == [Reason.EFFECTIVE]
    assert store.stats(9).zero_var_streak == 0


def test_exploration_adapts_to_the_target_and_persists(tmp_path, make_group):
    path = tmp_path / "h.db"
    cfg = SelectorConfig(target_effective_share=0.5, explore_init=0.5, explore_step=0.1)
    with HistoryStore(path) as s:
        sel = PromptSelector(s, cfg)
        sel.observe([GroupOutcome.ALL_FAIL] * 3 + [GroupOutcome.MIXED])  # 25% < 50%: skip more
        assert sel.state.explore == pytest.approx(0.4)
        sel.observe([GroupOutcome.MIXED] * 3 + [GroupOutcome.ALL_PASS])  # 75%: explore more
        assert sel.state.explore == pytest.approx(0.5)
        for _ in range(20):
            sel.observe([GroupOutcome.ALL_PASS])
        assert sel.state.explore == cfg.explore_min
        sel.observe([GroupOutcome.EMPTY])  # nothing learned: unchanged
        assert sel.state.explore == cfg.explore_min and sel.state.steps_observed == 22
        s.record_groups(0, [make_group(1, MIXED)])
        s.save(0)
        for _ in range(3):
            sel.observe([GroupOutcome.MIXED])
    with HistoryStore(path) as s:
        again = PromptSelector(s, cfg)
        assert again.state.explore == pytest.approx(cfg.explore_min + 0.3)
        s.load(0)
        again.reload_state()
        assert again.state.explore == cfg.explore_min


def test_selection_partitions_candidates_in_order(store, make_group):
    store.record_groups(0, [make_group(k, FAIL if k % 3 else MIXED) for k in range(60)])
    sel = PromptSelector(store)
    cands = list(range(80))
    result = sel.select(cands, 1, np.random.default_rng(3))
    assert [d.key for d in result.decisions] == cands
    assert sorted(result.selected + result.skipped) == cands
    assert result.selected == [d.key for d in result.decisions if d.keep]
    assert set(result.skipped).isdisjoint(range(60, 80))  # new prompts are never skipped


def test_config_validation():
    with pytest.raises(InvalidConfigError, match="explore_min <= explore_init"):
        SelectorConfig(explore_init=0.01, explore_min=0.05)
    with pytest.raises(InvalidConfigError, match="target_effective_share"):
        SelectorConfig(target_effective_share=1.5)
    with pytest.raises(InvalidConfigError, match="skip_backoff"):
        SelectorConfig(skip_backoff=0.5)
