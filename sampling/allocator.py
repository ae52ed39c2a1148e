"""How many samples each prompt gets, under a total budget (a knapsack over expected value).

Value of giving prompt i n samples: the chance its group has non-zero reward variance,

    v_i(n) = 1 - E[p^n] - E[(1-p)^n],    p ~ Beta(a_i, b_i)  (the history's pass-rate posterior)

(the expectation over p, not the plug-in estimate, so an uncertain prompt is worth more than a
confidently solved one). Cost: n times the prompt's expected response length (length predictor).
v_i is convex from 1 to 2 samples (one sample never has variance) and concave after, so each
prompt first "enters" with the size that has the best value per sample (at least min_n; 2 or 3
in practice), then gains one sample at a time in order of marginal value per expected token;
a sorted prefix of all these steps is taken until a budget (samples, tokens, groups) runs out.
With one budget, that greedy is within one item's value of the optimum (the LP bound; exactly
optimal when the budget ends on an item boundary). Prompts that get nothing are *deferred*: the
controller hands them back to the data source, so epoch coverage is unchanged.

Fixed-n mode (`AllocatorConfig.fixed_n`, slime's `n_samples_per_prompt`) keeps n and only chooses
which prompts get it, by v_i(n) per expected token. Ranking per token favours short prompts;
deferral (not dropping) keeps long ones in the epoch.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InvalidArgumentError, InvalidConfigError
from .history import HistoryStore
from .records import PromptKey, PromptStats


@dataclass(frozen=True, slots=True)
class AllocatorConfig:
    """min_n / max_n bound a prompt's samples; fixed_n switches to fixed-n mode."""

    min_n: int = 2
    max_n: int = 32
    fixed_n: int | None = None
    prior_strength: float = 2.0  # pseudo-samples of the global pass rate in each prompt's prior

    def __post_init__(self) -> None:
        if not 1 <= self.min_n <= self.max_n:
            raise InvalidConfigError(
                f"AllocatorConfig needs 1 <= min_n <= max_n (got {self.min_n}, {self.max_n})"
            )
        if self.fixed_n is not None and self.fixed_n < 1:
            raise InvalidConfigError(f"AllocatorConfig.fixed_n={self.fixed_n} must be >= 1")
        if not self.prior_strength > 0:
            raise InvalidConfigError("AllocatorConfig.prior_strength must be > 0")


@dataclass(frozen=True, slots=True)
class Budget:
    """Limits for one step; every limit given is respected (at least one is required)."""

    samples: int | None = None
    tokens: float | None = None
    groups: int | None = None

    def __post_init__(self) -> None:
        limits = (self.samples, self.tokens, self.groups)
        if all(x is None for x in limits):
            raise InvalidArgumentError("Budget needs at least one of samples, tokens, groups")
        for name, x in zip(("samples", "tokens", "groups"), limits, strict=True):
            if x is not None and not (isinstance(x, int | float) and x >= 0 and math.isfinite(x)):
                raise InvalidArgumentError(f"Budget.{name}={x!r} must be a finite number >= 0")


@dataclass(frozen=True, slots=True)
class Allocation:
    """Per-prompt sample counts (only n > 0) and what the budget bought."""

    counts: dict[PromptKey, int]
    deferred: list[PromptKey]
    pass_rates: dict[PromptKey, float]
    expected_effective_groups: float
    expected_tokens: float

    @property
    def total_samples(self) -> int:
        return sum(self.counts.values())


class SampleAllocator:
    """Per-prompt sample count under a budget; see the module docstring."""

    def __init__(self, store: HistoryStore, config: AllocatorConfig | None = None) -> None:
        self.store = store
        self.config = config or AllocatorConfig()

    def values(
        self,
        keys: Sequence[PromptKey],
        stats: Mapping[PromptKey, PromptStats],
        max_n: int,
        prior_rate: float,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(v[i, n] for n = 0..max_n, posterior mean pass rate[i])."""
        s = self.config.prior_strength
        found = [stats.get(key) for key in keys]
        succ = np.array([0.0 if st is None else st.pass_successes for st in found])
        trials = np.array([0.0 if st is None else st.pass_trials for st in found])
        a = s * prior_rate + succ
        b = s * (1.0 - prior_rate) + (trials - succ)
        v = 1.0 - beta_power_means(a, b, max_n) - beta_power_means(b, a, max_n)
        return np.maximum(v, 0.0), a / (a + b)

    def allocate(
        self,
        keys: Sequence[PromptKey],
        expected_lengths: Sequence[float],
        budget: Budget,
        stats: Mapping[PromptKey, PromptStats] | None = None,
        required: Collection[PromptKey] = (),
    ) -> Allocation:
        """Sample counts for `keys` (unique) given each prompt's expected response length.

        `required` prompts enter first (with min_n, or fixed_n), whatever their value: the
        planner uses it so that a prompt deferred again and again is not starved.
        """
        keys = list(keys)
        if len(set(keys)) != len(keys):
            raise InvalidArgumentError("allocate: candidate keys must be unique")
        cost = np.asarray(expected_lengths, dtype=np.float64)
        if cost.shape != (len(keys),):
            raise InvalidArgumentError(
                f"allocate: expected_lengths has shape {cost.shape}; expected ({len(keys)},)"
            )
        if not np.isfinite(cost).all() or (cost <= 0).any():
            raise InvalidArgumentError("allocate: expected_lengths must be finite and > 0")
        if not keys:
            return Allocation({}, [], {}, 0.0, 0.0)
        if stats is None:
            stats = self.store.prompt_stats(keys)
        prior = self.store.global_stats().pass_rate
        cfg = self.config
        lo, hi = (cfg.fixed_n, cfg.fixed_n) if cfg.fixed_n else (cfg.min_n, cfg.max_n)
        v, p = self.values(keys, stats, hi, prior)
        k = len(keys)

        # Items per prompt (one row): column 0 enters the prompt with `entry` samples, column
        # j >= 1 brings it to lo + j samples. v is convex up to n = 2 (one sample never has
        # variance) and concave after, so the entry takes the size with the best value per
        # sample; the columns it covers become free no-ops that sort right behind it.
        steps = hi - lo + 1
        held = lo + np.arange(steps)
        rows = np.arange(k)
        per_sample = v[:, lo:] / held[None, :]
        # The smallest size within rounding of the best (v(2)/2 and v(3)/3 tie exactly).
        best = per_sample.max(axis=1, keepdims=True)
        entry = lo + np.argmax(per_sample >= best * (1 - 1e-9), axis=1)
        later = held[None, 1:] > entry[:, None]
        gain = np.zeros((k, steps))
        samples = np.zeros((k, steps))
        gain[:, 0], samples[:, 0] = v[rows, entry], entry
        gain[:, 1:] = np.where(later, np.diff(v[:, lo:], axis=1), 0.0)
        samples[:, 1:] = later
        ratio = np.where(samples > 0, gain / np.maximum(samples, 1) / cost[:, None], 0.0)
        ratio[:, 1:] = np.where(later, ratio[:, 1:], ratio[:, :1])
        if required:
            need = np.array([key in required for key in keys])
            ratio[need, 0] = np.inf
        # After the entry the ratios do not increase (concavity); the running minimum only
        # irons out rounding. Sorting by (key desc, column asc) then keeps each prompt's taken
        # items a prefix of its row, which is what makes the greedy optimal.
        key = np.minimum.accumulate(ratio, axis=1)
        order = np.lexsort((np.tile(np.arange(steps), k), -key.ravel()))
        s_flat = samples.ravel()[order]
        t_flat = (samples * cost[:, None]).ravel()[order]
        e_flat = (np.arange(k * steps) % steps == 0)[order]
        fits = np.ones(order.size, dtype=bool)
        for limit, used in (
            (budget.samples, s_flat),
            (budget.tokens, t_flat),
            (budget.groups, e_flat),
        ):
            if limit is not None:
                fits &= np.cumsum(used) <= limit + 1e-9
        taken = order[: int(np.argmin(fits)) if not fits.all() else order.size]
        n = np.zeros(k, dtype=np.int64)
        np.add.at(n, taken // steps, samples.ravel()[taken].astype(np.int64))

        counts = {keys[i]: int(n[i]) for i in range(k) if n[i] > 0}
        return Allocation(
            counts=counts,
            deferred=[keys[i] for i in range(k) if n[i] == 0],
            pass_rates={keys[i]: float(p[i]) for i in range(k)},
            expected_effective_groups=float(v[np.arange(k), n].sum()),
            expected_tokens=float((n * cost).sum()),
        )


def beta_power_means(a: np.ndarray, b: np.ndarray, max_n: int) -> np.ndarray:
    """E[p^k] for p ~ Beta(a, b), k = 0..max_n, as an array [len(a), max_n + 1].

    Uses E[p^k] = prod_{i<k} (a + i) / (a + b + i), so no gamma functions are needed.
    """
    a = np.asarray(a, dtype=np.float64)[:, None]
    b = np.asarray(b, dtype=np.float64)[:, None]
    i = np.arange(max_n, dtype=np.float64)[None, :]
    out = np.ones((a.shape[0], max_n + 1))
    out[:, 1:] = np.cumprod((a + i) / (a + b + i), axis=1)
    return out


def zero_variance_probability(p: float, n: int) -> float:
    """Chance a group of n samples with pass rate p is all-pass or all-fail: p^n + (1-p)^n."""
    return p**n + (1.0 - p) ** n
