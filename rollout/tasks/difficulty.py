"""Per-prompt difficulty with a heavy-ish tail: P(k) proportional to k^-alpha on [low, high].

Most prompts are short and a few are long, which is the length structure (and long tail) that
rollout policies are meant to cope with.
"""

from __future__ import annotations

import random


def check_power_law(low: int, high: int, alpha: float, what: str) -> None:
    """Raise ValueError unless `1 <= low <= high` and `alpha >= 0`."""
    if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high):
        raise ValueError(f"{what}: need integers 1 <= low <= high, got low={low!r}, high={high!r}")
    if not alpha >= 0:
        raise ValueError(f"{what}: tail exponent alpha must be >= 0, got {alpha!r}")


def power_law_weights(low: int, high: int, alpha: float) -> list[float]:
    """Unnormalised weights of k = low..high; alpha = 0 is uniform, larger is lighter-tailed."""
    return [k ** (-alpha) for k in range(low, high + 1)]


def draw_difficulty(rng: random.Random, low: int, high: int, alpha: float) -> int:
    """One k in [low, high] with P(k) proportional to k^-alpha."""
    return rng.choices(range(low, high + 1), weights=power_law_weights(low, high, alpha))[0]
