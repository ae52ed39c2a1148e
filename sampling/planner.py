"""One rollout step's sampling plan, composed from the parts: what the controller calls.

    plan = planner.plan(candidates, prompt_lengths, step, budget, rng)
        1. history: one snapshot read of the candidates' summaries
        2. selector: skip likely zero-variance prompts (skips are recorded at once)
        3. length predictor: expected and p90 response length per kept prompt
        4. allocator: n per prompt under the budget (or fixed n: which prompts get it)
        5. order: longest-first by the p90 length (stragglers start first)
    ... the controller generates plan.items, in order ...
    planner.record(step, groups)    # one transaction; adapts the selector's exploration

Every candidate lands in exactly one of `plan.items` (roll out), `plan.skipped` (visited this
epoch, not rolled out) or `plan.deferred` (not reached by the budget: hand back to the data
source so it comes again). That keeps epoch coverage the data source's. A prompt deferred
`max_deferrals` times in a row gets budget before any other next time it is a candidate, so the
allocator's value-per-token ranking cannot starve it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .allocator import AllocatorConfig, Budget, SampleAllocator
from .errors import InvalidArgumentError, InvalidConfigError
from .history import HistoryStore
from .length import LengthConfig, LengthEstimate, LengthPredictor
from .records import GroupOutcome, GroupRecord, PromptKey
from .selector import PromptSelector, Reason, SelectorConfig


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    """The parts' configs, whether skipping is on (off: every candidate is kept), and the
    deferral bound that keeps the allocator from starving a low-value prompt."""

    selector: SelectorConfig = field(default_factory=SelectorConfig)
    allocator: AllocatorConfig = field(default_factory=AllocatorConfig)
    length: LengthConfig = field(default_factory=LengthConfig)
    skip: bool = True
    max_deferrals: int = 2  # a prompt deferred this often gets budget first next time

    def __post_init__(self) -> None:
        if self.max_deferrals < 0:
            raise InvalidConfigError(f"PlannerConfig.max_deferrals={self.max_deferrals} < 0")


@dataclass(frozen=True, slots=True)
class PlannedPrompt:
    key: PromptKey
    n: int
    expected_length: float
    upper_length: float
    reason: Reason
    pass_rate: float


@dataclass(frozen=True, slots=True)
class RolloutPlan:
    """items: longest-first; skipped and deferred as in the module docstring."""

    step: int
    items: list[PlannedPrompt]
    skipped: list[PromptKey]
    deferred: list[PromptKey]
    expected_effective_groups: float
    expected_tokens: float
    reasons: dict[str, int]

    def metrics(self) -> dict[str, float]:
        """Flat numbers for logging (W&B names are the caller's business)."""
        out: dict[str, float] = {
            "planned_groups": float(len(self.items)),
            "planned_samples": float(sum(i.n for i in self.items)),
            "skipped": float(len(self.skipped)),
            "deferred": float(len(self.deferred)),
            "expected_effective_groups": self.expected_effective_groups,
            "expected_tokens": self.expected_tokens,
        }
        out.update({f"reason_{k}": float(v) for k, v in self.reasons.items()})
        return out


class RolloutPlanner:
    """Selector + length predictor + allocator over one history store."""

    def __init__(self, store: HistoryStore, config: PlannerConfig | None = None) -> None:
        self.store = store
        self.config = config or PlannerConfig()
        self.selector = PromptSelector(store, self.config.selector)
        self.lengths = LengthPredictor(store, self.config.length)
        self.allocator = SampleAllocator(store, self.config.allocator)
        self._deferrals: dict[PromptKey, int] = {}

    def plan(
        self,
        candidates: Sequence[PromptKey],
        prompt_lengths: Sequence[int | None] | None,
        step: int,
        budget: Budget,
        rng: np.random.Generator,
        required: Collection[PromptKey] = (),
    ) -> RolloutPlan:
        """Decide this step's prompts, their n and their dispatch order (see module docstring).

        `required` candidates that the selector keeps get budget before any other, whatever
        their value per token (the caller's exploration floor)."""
        candidates = list(candidates)
        if len(set(candidates)) != len(candidates):
            raise InvalidArgumentError("plan: candidate keys must be unique")
        if prompt_lengths is None:
            prompt_lengths = [None] * len(candidates)
        if len(prompt_lengths) != len(candidates):
            raise InvalidArgumentError(
                f"plan: {len(prompt_lengths)} prompt_lengths for {len(candidates)} candidates"
            )
        stats = self.store.prompt_stats(candidates)
        if self.config.skip:
            selection = self.selector.select(candidates, step, rng, stats)
            reason = {d.key: d.reason for d in selection.decisions}
            kept, skipped = selection.selected, selection.skipped
            if skipped and not self.store.readonly:
                self.store.record_skips(step, skipped)
        else:
            reason = {k: Reason.NEW if k not in stats else Reason.EFFECTIVE for k in candidates}
            kept, skipped = candidates, []
        plen: Mapping[PromptKey, int | None] = dict(zip(candidates, prompt_lengths, strict=True))
        estimates = self.lengths.predict(kept, [plen[k] for k in kept], stats)
        wanted = set(required)
        overdue = {
            k for k in kept if k in wanted or self._deferrals.get(k, 0) >= self.config.max_deferrals
        }
        allocation = self.allocator.allocate(
            kept, [e.mean for e in estimates], budget, stats, required=overdue
        )
        for k in allocation.deferred:
            self._deferrals[k] = self._deferrals.get(k, 0) + 1
        for k in [*allocation.counts, *skipped]:
            self._deferrals.pop(k, None)
        by_key: dict[PromptKey, LengthEstimate] = {e.key: e for e in estimates}
        items = [
            PlannedPrompt(
                key=k,
                n=n,
                expected_length=by_key[k].mean,
                upper_length=by_key[k].upper,
                reason=reason[k],
                pass_rate=allocation.pass_rates[k],
            )
            for k, n in allocation.counts.items()
        ]
        items.sort(key=lambda i: i.upper_length, reverse=True)
        counts = {r.value: 0 for r in Reason}
        for k in candidates:
            counts[reason[k].value] += 1
        return RolloutPlan(
            step=step,
            items=items,
            skipped=list(skipped),
            deferred=allocation.deferred,
            expected_effective_groups=allocation.expected_effective_groups,
            expected_tokens=allocation.expected_tokens,
            reasons=counts,
        )

    def record(self, step: int, groups: Sequence[GroupRecord]) -> list[GroupOutcome]:
        """Record the step's finished groups (one transaction) and adapt exploration."""
        outcomes = self.store.record_groups(step, groups)
        self.selector.observe(outcomes)
        return outcomes

    def reload(self) -> None:
        """Re-read persisted policy state, e.g. after `store.load(rollout_id)`.

        Deferral counts live in memory only: after a restart a deferred prompt may wait
        `max_deferrals` more steps, which bounds the loss.
        """
        self.selector.reload_state()
        self._deferrals.clear()
