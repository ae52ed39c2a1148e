"""The long tail of a rollout step, policy v2: tail batching and the max-of-n length budget.

Tail batching (RollPacker): a prompt predicted among the longest `share` of recent predictions is
not started in an ordinary step; it waits in the `TailPool` and runs in a *long round* together
with the other long ones, so ordinary steps are not stretched by it. A long round happens when
the pool holds a step's worth of groups, or `every` steps after the previous one. Pooled prompts
have not started, so they never break the staleness bound, and every pooled prompt runs in the
next long round at the latest (the pool is drained longest-first, at most `provision` at a time;
what is left leads the next round).

The max-of-n tail: a group ends with its slowest sample. `tail_budget` gives the samples still
running, once enough of their siblings are done, a length budget derived from those siblings
(what siblings wrote is the best first-epoch predictor of a sample's length: ~65% of length
variance is the prompt's). See `sibling_budget`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

W = TypeVar("W")

# Predictions needed before the pool trusts its quantile (before that, nothing is pooled).
MIN_PREDICTIONS = 32


class TailPool(Generic[W]):
    """Unstarted work predicted long, held for the next long round (module docstring)."""

    def __init__(
        self, share: float, every: int, length: Callable[[W], float], window: int = 2048
    ) -> None:
        self.share = share
        self.every = every
        self.length = length
        self.recent: deque[float] = deque(maxlen=window)
        self.pool: list[W] = []
        self.last_round: int | None = None

    def __len__(self) -> int:
        return len(self.pool)

    def threshold(self) -> float:
        """Predicted length above which new work is pooled (inf until enough predictions)."""
        if len(self.recent) < MIN_PREDICTIONS or self.share <= 0.0:
            return math.inf
        ordered = sorted(self.recent)
        at = min(len(ordered) - 1, math.floor((1.0 - self.share) * len(ordered)))
        return ordered[at]

    def admit(self, work: Sequence[W], long_round: bool) -> list[W]:
        """Records the predictions of `work`; returns what runs now, pools the rest (in a long
        round everything runs now)."""
        self.recent.extend(self.length(w) for w in work)
        if long_round:
            return list(work)
        cut = self.threshold()
        now = [w for w in work if self.length(w) <= cut]
        self.pool.extend(w for w in work if self.length(w) > cut)
        return now

    def is_long_round(self, step: int, provision: int) -> bool:
        if not self.pool:
            return False
        since = step - (self.last_round if self.last_round is not None else -1)
        return len(self.pool) >= provision or since >= self.every

    def drain(self, step: int, count: int) -> list[W]:
        """Up to `count` pooled items, longest first; marks `step` as a long round."""
        self.last_round = step
        self.pool.sort(key=self.length, reverse=True)
        out, self.pool = self.pool[:count], self.pool[count:]
        return out


def sibling_budget(
    done_lengths: Sequence[int], group_size: int, factor: float, done_share: float, floor: int
) -> int | None:
    """The length budget for a group's unfinished samples, or None while too few are done.

    Applies once at least ceil(done_share * group_size) samples (and at least one) are done:
    max(factor x the longest finished sibling, floor) tokens.
    """
    need = max(1, math.ceil(done_share * group_size))
    if len(done_lengths) < need or len(done_lengths) >= group_size:
        return None
    return max(math.ceil(factor * max(done_lengths)), floor)


def sibling_estimate(done_lengths: Sequence[int], written: int) -> float:
    """Predicted final length of an unfinished sample from its finished siblings (first-epoch
    signal): the longest sibling, but never less than twice what it has already written."""
    base = float(max(done_lengths)) if done_lengths else 0.0
    return max(base, 2.0 * written, 1.0)
