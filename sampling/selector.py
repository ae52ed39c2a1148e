"""Which candidate prompts to roll out now: skip likely zero-variance groups, keep exploring.

A group whose rewards are all equal has zero GRPO advantage. Prompts that were all-correct or
all-wrong recently tend to stay so (GRESO: ~80% stay zero-variance next epoch), so the selector
skips a prompt with probability growing in its *streak* of consecutive zero-variance groups:

    keep probability = explore ** (streak - min_streak + 1)

and keeps everything else (new prompts, prompts whose last group was mixed). Invariants:

- Adaptive exploration: after each step, `observe` lowers `explore` by `explore_step` when the
  share of effective (mixed) groups among the rolled ones is below `target_effective_share`,
  and raises it otherwise, within [explore_min, explore_max].
- No starvation: a prompt skipped `skip_bound(streak)` times in a row is kept (FORCED). The
  bound is max_consecutive_skips (3) after the first zero-variance group and grows by
  `skip_backoff` (x2) per further one (exponential backoff: a prompt that stayed zero-variance
  through several retries is retried less often), never above `max_skips_bound` (12). So every
  prompt is rolled out at least once every max_skips_bound + 1 epochs. A prompt that flips
  from all-wrong to mixed resets its streak and is kept from then on.
- Epoch coverage: the selector never reorders or holds back prompts. Each candidate the data
  source hands out is either selected or skipped; a skipped prompt counts as visited for this
  epoch and is a candidate again next epoch. Epoch boundaries stay the data source's.

The controller records skips with `HistoryStore.record_skips` (the planner does this).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

import numpy as np

from .errors import InvalidConfigError
from .history import HistoryStore
from .records import GroupOutcome, PromptKey, PromptStats

_STATE_NAME = "selector"


class Reason(StrEnum):
    """Why the selector kept or skipped a candidate."""

    NEW = "new"  # no history: always rolled out
    EFFECTIVE = "effective"  # last group was mixed (or the streak is below min_streak)
    EXPLORE = "explore"  # zero-variance streak, kept by the exploration draw
    FORCED = "forced"  # skipped skip_bound(streak) times in a row: kept (starvation guard)
    SKIP = "skip"


@dataclass(frozen=True, slots=True)
class SelectorConfig:
    """Skip policy knobs (defaults follow GRESO's shape: start at 0.5, small additive steps)."""

    target_effective_share: float = 0.75
    explore_init: float = 0.5
    explore_min: float = 0.05
    explore_max: float = 1.0
    explore_step: float = 0.02
    min_streak: int = 1
    max_consecutive_skips: int = 3
    skip_backoff: float = 2.0  # the skip bound doubles per extra zero-variance group...
    max_skips_bound: int = 12  # ...up to this hard bound, whatever the streak

    def __post_init__(self) -> None:
        if not 0.0 <= self.target_effective_share <= 1.0:
            raise InvalidConfigError("SelectorConfig.target_effective_share must be in [0, 1]")
        if not 0.0 <= self.explore_min <= self.explore_init <= self.explore_max <= 1.0:
            raise InvalidConfigError(
                "SelectorConfig needs 0 <= explore_min <= explore_init <= explore_max <= 1 "
                f"(got {self.explore_min}, {self.explore_init}, {self.explore_max})"
            )
        if self.explore_step < 0 or self.min_streak < 1 or self.max_consecutive_skips < 0:
            raise InvalidConfigError(
                "SelectorConfig needs explore_step >= 0, min_streak >= 1, "
                "max_consecutive_skips >= 0"
            )
        if self.skip_backoff < 1.0 or self.max_skips_bound < self.max_consecutive_skips:
            raise InvalidConfigError(
                "SelectorConfig needs skip_backoff >= 1 and max_skips_bound >= "
                "max_consecutive_skips"
            )


@dataclass(slots=True)
class SelectorState:
    """The adaptive part of the selector; persisted in the history (saved with checkpoints)."""

    explore: float
    steps_observed: int = 0

    def to_dict(self) -> dict[str, object]:
        return {"explore": self.explore, "steps_observed": self.steps_observed}

    @classmethod
    def from_dict(cls, value: Mapping[str, object], config: SelectorConfig) -> SelectorState:
        raw = value.get("explore", config.explore_init)
        rate = float(raw) if isinstance(raw, int | float) else config.explore_init
        steps = value.get("steps_observed", 0)
        return cls(
            min(max(rate, config.explore_min), config.explore_max),
            int(steps) if isinstance(steps, int) else 0,
        )


class Decision(NamedTuple):
    """One candidate's verdict (a NamedTuple: one is built per candidate per step)."""

    key: PromptKey
    keep: bool
    reason: Reason
    keep_probability: float


@dataclass(frozen=True, slots=True)
class SelectionResult:
    """The selector's answer; `decisions` is aligned with the candidates given."""

    decisions: list[Decision]
    selected: list[PromptKey] = field(default_factory=list)
    skipped: list[PromptKey] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Number of candidates per reason (for metrics)."""
        found = Counter(d.reason.value for d in self.decisions)
        return {r.value: found.get(r.value, 0) for r in Reason}


class PromptSelector:
    """Decides per candidate prompt: roll out now, or skip (see the module docstring)."""

    def __init__(self, store: HistoryStore, config: SelectorConfig | None = None) -> None:
        self.store = store
        self.config = config or SelectorConfig()
        self.state = SelectorState(self.config.explore_init)
        self.reload_state()

    def reload_state(self) -> None:
        """Read the persisted exploration rates (call after `HistoryStore.load`)."""
        saved = self.store.get_state(_STATE_NAME)
        if saved is not None:
            self.state = SelectorState.from_dict(saved, self.config)

    def skip_bound(self, streak: int) -> int:
        """Consecutive skips allowed for a prompt with this zero-variance streak."""
        cfg = self.config
        grown = cfg.max_consecutive_skips * cfg.skip_backoff ** max(streak - cfg.min_streak, 0)
        return int(min(grown, cfg.max_skips_bound))

    def keep_probability(self, stats: PromptStats | None) -> tuple[float, Reason]:
        """Probability of keeping a prompt with these stats, and the reason if kept."""
        cfg = self.config
        if stats is None:
            return 1.0, Reason.NEW
        if not stats.last_outcome.zero_variance or stats.zero_var_streak < cfg.min_streak:
            return 1.0, Reason.EFFECTIVE
        if stats.skips_since_rollout >= self.skip_bound(stats.zero_var_streak):
            return 1.0, Reason.FORCED
        return self.state.explore ** (stats.zero_var_streak - cfg.min_streak + 1), Reason.EXPLORE

    def select(
        self,
        candidates: Sequence[PromptKey],
        step: int,
        rng: np.random.Generator,
        stats: Mapping[PromptKey, PromptStats] | None = None,
    ) -> SelectionResult:
        """Decide every candidate. `stats` may be passed when already read (saves a query).

        `step` is the rollout step the decision is for (recorded with skips by the planner).
        """
        del step  # decisions depend on history only; kept in the signature for logging symmetry
        if stats is None:
            stats = self.store.prompt_stats(candidates)
        draws = rng.random(len(candidates))
        decisions = []
        selected, skipped = [], []
        for key, u in zip(candidates, draws, strict=True):
            p, reason = self.keep_probability(stats.get(key))
            keep = p >= 1.0 or u < p
            decisions.append(Decision(key, keep, reason if keep else Reason.SKIP, p))
            (selected if keep else skipped).append(key)
        return SelectionResult(decisions, selected, skipped)

    def observe(self, outcomes: Sequence[GroupOutcome]) -> None:
        """Adapt exploration from one step's rolled-out groups, then persist the state.

        Below the target effective share, exploration drops by `explore_step` (skip more);
        at or above it, exploration rises (re-check skipped prompts more often).
        """
        counted = [o for o in outcomes if o is not GroupOutcome.EMPTY]
        if not counted:
            return
        cfg = self.config
        share = sum(o is GroupOutcome.MIXED for o in counted) / len(counted)
        delta = -cfg.explore_step if share < cfg.target_effective_share else cfg.explore_step
        self.state.explore = min(max(self.state.explore + delta, cfg.explore_min), cfg.explore_max)
        self.state.steps_observed += 1
        if not self.store.readonly:
            self.store.put_state(_STATE_NAME, self.state.to_dict())
