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
MIN_PREDICTIONS = 16


class TailPool(Generic[W]):
    """Unstarted work predicted long, held for the next long round (module docstring)."""

    def __init__(self, share: float, every: int, length: Callable[[W], float]) -> None:
        self.share = share
        self.every = every
        self.length = length
        # (step, prediction) of the last `every` steps: the quantile follows the predictor as it
        # learns (the first step's predictions are the cold-start prior, all alike).
        self._seen: deque[tuple[int, float]] = deque()
        self.pool: list[W] = []
        self.last_round: int | None = None

    @property
    def recent(self) -> list[float]:
        return [x for _, x in self._seen]

    def observe(self, step: int, lengths: Sequence[float]) -> None:
        self._seen.extend((step, float(x)) for x in lengths)
        while self._seen and self._seen[0][0] <= step - max(self.every, 2):
            self._seen.popleft()

    def __len__(self) -> int:
        return len(self.pool)

    def threshold(self) -> float:
        """Predicted length above which new work is pooled (inf until enough predictions)."""
        ordered = sorted(self.recent)
        if len(ordered) < MIN_PREDICTIONS or self.share <= 0.0:
            return math.inf
        at = min(len(ordered) - 1, math.floor((1.0 - self.share) * len(ordered)))
        return ordered[at]

    def admit(self, work: Sequence[W], step: int, long_round: bool) -> list[W]:
        """Records the predictions of `work`; returns what runs now, pools the rest (in a long
        round everything runs now)."""
        self.observe(step, [self.length(w) for w in work])
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
