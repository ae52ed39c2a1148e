"""Settings of the rollout controller: which policy, how many groups, staleness, masking."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

POLICIES = ("sync", "dynamic", "partial", "history")


class ControllerConfigError(ValueError):
    """A controller setting that cannot work; the message names the key."""


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    """One rollout step's rules.

    policy: `sync` (slime's default: every requested group completes), `dynamic` (DAPO: over-
    sample, drop zero-variance groups, refill, discard the surplus), `partial` (APRIL: over-
    provision, abort the rest at target, resume the partials first next step), `history` (ours:
    history-informed selection + longest-first dispatch + partial rollout, resumed oldest-first).
    dynamic_filter: None = the policy's default (on for dynamic only; history already steers
    away from zero-variance prompts before generating, so it returns groups unfiltered unless asked).
    over_sampling: groups in flight = ceil(rollout_batch_size * over_sampling) (1.0 for sync).

    Policy v2 (history; None = on for history, off otherwise):
    length_pricing: choose among 2x candidates by value per predicted token (Knapsack-RL), with
      `explore_floor` of each step's new groups taken in data order whatever their price, so a
      prompt predicted long or hard is never starved.
    tail_batching: new prompts predicted in the longest `tail_share` are pooled and run together
      in a long round (when the pool holds a step's worth of groups, or `tail_round_every` steps
      after the last one) instead of stretching every step (RollPacker). Pooled prompts are not
      started, so the staleness bound is untouched.
    length_placement: pool placement and dispatch by predicted tokens (not the cap), and
      per-engine concurrency from the engine's KV budget (`EnginePool.fit_concurrency_to_kv`).
    tail_budget: the max-of-n tail (default off): once `tail_budget_done` of a group's samples
      are done, the rest may run at most max(tail_budget x the longest done sibling,
      tail_budget_min) tokens; a sample cut there is treated as slime treats truncation
      (`tail_cut`: "truncate" = status TRUNCATED, rewarded on what it wrote; "mask" =
      additionally out of the loss, DAPO's overlong filtering).
    finish_stale: a running group that would break the staleness bound if carried is finished
      in this step (the step stays open for it, the engine keeps generating the others, and it
      takes the place of a fresh accepted group, which is carried instead) rather than dropped
      with all its tokens at the next step. None = on for history with a tail budget.
    drafts: attach the prompt's corpus key to every request (`sampling_params.custom_params.
      spec_corpus_id`, `draft_corpus_prefix` + prompt key) for speculative decoding from history.
    """

    policy: str = "sync"
    rollout_batch_size: int = 32
    n_samples_per_prompt: int = 8
    over_sampling: float = 1.5
    dynamic_filter: bool | None = None
    max_staleness: int = 1
    stale_action: str = "drop"
    mask_offpolicy: bool = False
    keep_surplus: bool = True
    max_candidates_factor: float = 8.0
    reward_key: str | None = None
    record_responses: bool = False
    length_pricing: bool | None = None
    explore_floor: float = 0.125
    tail_batching: bool | None = None
    tail_share: float = 0.25
    tail_round_every: int = 4
    length_placement: bool | None = None
    finish_stale: bool | None = None
    tail_budget: float | None = None
    tail_budget_done: float = 0.75
    tail_budget_min: int = 16
    tail_cut: str = "truncate"
    drafts: bool = False
    draft_corpus_prefix: str = "prompt:"
    sampling_params: dict[str, Any] = field(
        default_factory=lambda: {
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": -1,
            "max_new_tokens": 1024,
        }
    )
    seed: int = 0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ControllerConfigError(f"policy: {self.policy!r} is not one of {POLICIES}")
        for name in ("rollout_batch_size", "n_samples_per_prompt"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ControllerConfigError(f"{name}: must be a positive integer, got {value!r}")
        if not isinstance(self.over_sampling, int | float) or self.over_sampling < 1.0:
            raise ControllerConfigError(
                f"over_sampling: must be >= 1.0, got {self.over_sampling!r}"
            )
        if not isinstance(self.max_staleness, int) or self.max_staleness < 0:
            raise ControllerConfigError(
                f"max_staleness: must be an integer >= 0, got {self.max_staleness!r}"
            )
        if self.stale_action not in ("drop", "restart"):
            raise ControllerConfigError(
                f"stale_action: {self.stale_action!r} is not drop or restart"
            )
        for name in ("explore_floor", "tail_share", "tail_budget_done"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ControllerConfigError(f"{name}: must be in [0, 1], got {value!r}")
        if not isinstance(self.tail_round_every, int) or self.tail_round_every < 1:
            raise ControllerConfigError(
                f"tail_round_every: must be an integer >= 1, got {self.tail_round_every!r}"
            )
        if self.tail_budget is not None and (
            not isinstance(self.tail_budget, int | float) or self.tail_budget < 1.0
        ):
            raise ControllerConfigError(
                f"tail_budget: must be None (off) or >= 1.0, got {self.tail_budget!r}"
            )
        if not isinstance(self.tail_budget_min, int) or self.tail_budget_min < 1:
            raise ControllerConfigError(
                f"tail_budget_min: must be an integer >= 1, got {self.tail_budget_min!r}"
            )
        if self.tail_cut not in ("truncate", "mask"):
            raise ControllerConfigError(f"tail_cut: {self.tail_cut!r} is not truncate or mask")
        if (
            not isinstance(self.sampling_params, dict)
            or "max_new_tokens" not in self.sampling_params
        ):
            raise ControllerConfigError("sampling_params: must be a dict with max_new_tokens")

    @property
    def filter_enabled(self) -> bool:
        if self.dynamic_filter is not None:
            return self.dynamic_filter
        return self.policy == "dynamic"

    def _v2(self, value: bool | None) -> bool:
        return value if value is not None else self.policy == "history"

    @property
    def prices_length(self) -> bool:
        return self._v2(self.length_pricing)

    @property
    def batches_tail(self) -> bool:
        return self._v2(self.tail_batching)

    @property
    def finishes_stale(self) -> bool:
        # Default: on for history when the tail budget bounds the stragglers it would wait for
        # (without it, waiting for a runaway sample costs nearly the full cap).
        if self.finish_stale is not None:
            return self.finish_stale
        return self.policy == "history" and self.tail_budget is not None

    @property
    def places_by_length(self) -> bool:
        return self._v2(self.length_placement)

    @property
    def keeps_partials(self) -> bool:
        return self.policy in ("partial", "history")

    @property
    def provision(self) -> int:
        """Groups kept in flight (accepted + running) until the target is reached."""
        import math

        factor = 1.0 if self.policy == "sync" else self.over_sampling
        return max(self.rollout_batch_size, math.ceil(self.rollout_batch_size * factor))

    @classmethod
    def from_mapping(cls, raw: dict[str, Any], prefix: str = "") -> ControllerConfig:
        """Builds from a dict (e.g. YAML), refusing unknown keys and wrong types by name."""
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            name = key[len(prefix) :] if prefix and key.startswith(prefix) else key
            if name not in known:
                raise ControllerConfigError(f"{key}: unknown setting; known: {sorted(known)}")
            kwargs[name] = value
        return cls(**kwargs)
