"""Choosing the layer partition: the split that minimises the predicted bottleneck stage, and
when to switch to it.

`best_bounds` is a small DP over layer counts (contiguous stages, at least one layer each).
`Rebalancer` proposes a new partition only when the predicted bottleneck drops by more than
`threshold` (relative), no sooner than `interval` steps after the last change, and only if the
last change paid off (the measured bottleneck did not get worse); a change that did not pay off
is undone once and doubles the threshold (hysteresis: no flapping between near-equal splits).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from rollout_accel.serving.pipeline.partition import Bounds, bounds_from_counts, counts_of


def best_bounds(stage_time: Callable[[int, int], float], num_layers: int, pp_size: int) -> Bounds:
    """The partition minimising max_i stage_time(i, layers of stage i) (ties: the earliest)."""
    inf = float("inf")
    # cost[i][n]: the best bottleneck of stages 0..i holding the first n layers.
    cost = [[inf] * (num_layers + 1) for _ in range(pp_size)]
    pick = [[0] * (num_layers + 1) for _ in range(pp_size)]
    for n in range(1, num_layers - pp_size + 2):
        cost[0][n] = stage_time(0, n)
        pick[0][n] = n
    for i in range(1, pp_size):
        for n in range(i + 1, num_layers - (pp_size - 1 - i) + 1):
            for k in range(1, n - i + 1):
                value = max(cost[i - 1][n - k], stage_time(i, k))
                if value < cost[i][n] - 1e-15:
                    cost[i][n], pick[i][n] = value, k
    counts = []
    n = num_layers
    for i in range(pp_size - 1, -1, -1):
        k = pick[i][n]
        counts.append(k)
        n -= k
    return bounds_from_counts(counts[::-1])


def bottleneck(stage_time: Callable[[int, int], float], bounds: Bounds) -> float:
    return max(stage_time(i, c) for i, c in enumerate(counts_of(bounds)))


@dataclass(slots=True)
class Change:
    step: int
    before: Bounds
    after: Bounds
    predicted_gain: float
    measured_before: float
    measured_after: float | None = None
    revert: bool = False


@dataclass(slots=True)
class Rebalancer:
    """Decides partition changes from predicted stage times (see module docstring)."""

    num_layers: int
    pp_size: int
    threshold: float = 0.05
    interval: int = 16
    window: int = 8
    base_threshold: float = field(init=False)
    changes: list[Change] = field(default_factory=list)
    _recent: list[float] = field(default_factory=list)
    _last_step: int | None = None  # the first proposal waits `interval` steps (warm-up)
    _revert_to: Bounds | None = None

    def __post_init__(self) -> None:
        self.base_threshold = self.threshold

    def observe(self, measured_bottleneck: float) -> None:
        """The measured bottleneck (max stage busy time) of a step."""
        self._recent.append(measured_bottleneck)
        if len(self._recent) > self.window:
            self._recent.pop(0)
        last = self.changes[-1] if self.changes else None
        if last is not None and last.measured_after is None and len(self._recent) >= self.window:
            last.measured_after = sum(self._recent) / len(self._recent)
            paid = last.measured_after <= last.measured_before
            if not last.revert:  # a revert's outcome says nothing about the threshold
                self.threshold = self.base_threshold if paid else min(2 * self.threshold, 0.5)
                if not paid:
                    self._revert_to = last.before

    def propose(
        self, step: int, current: Bounds, stage_time: Callable[[int, int], float]
    ) -> Bounds | None:
        """A better partition, or None (too soon, not enough gain, or waiting for the payoff)."""
        if self._last_step is None:
            self._last_step = step
        if step - self._last_step < self.interval:
            return None
        if self.changes and self.changes[-1].measured_after is None:
            return None
        measured = sum(self._recent) / len(self._recent) if self._recent else 0.0
        if self._revert_to is not None:
            # The last change made the measured bottleneck worse: undo it (once).
            target, self._revert_to = self._revert_to, None
            if target != current:
                self.changes.append(Change(step, current, target, 0.0, measured, revert=True))
                self._last_step = step
                self._recent.clear()
                return target
        target = best_bounds(stage_time, self.num_layers, self.pp_size)
        now, then = bottleneck(stage_time, current), bottleneck(stage_time, target)
        if target == current or now <= 0 or (now - then) / now <= self.threshold:
            return None
        measured = measured or now
        self.changes.append(Change(step, current, target, (now - then) / now, measured))
        self._last_step = step
        self._recent.clear()
        return target
