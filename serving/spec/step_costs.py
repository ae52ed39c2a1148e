"""What a drafting step costs relative to a plain decode step, as the engine loop measures it.

A drafting step is synchronous (the proposer reads each row's last token on the host) and scores
1 + k tokens a row; a plain step overlaps with the host's work. On one H200 (qwen3-0.6b-shape,
256 rows) a drafting step took ~2.3x a plain one, so drafting paid only when the batch's rows
were expected to accept more than ~1.3 tokens each — a figure that depends on the model, the
batch and the machine. The engine loop reports each step's launch-to-next-launch period here by
kind; `break_even_gain` is the expected accepted tokens per row a drafting step must bring to
beat plain decoding on throughput: (n + sum E) / t_verify > n / t_plain <=> sum E / n >
t_verify / t_plain - 1.

Invariant: periods that include idle time (the loop waited for work) are never reported.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class StepCosts:
    """Exponentially weighted mean period of drafting and plain steps (seconds)."""

    decay: float = 0.9
    min_samples: int = 3
    verify_s: float = 0.0
    plain_s: float = 0.0
    verify_n: int = 0
    plain_n: int = 0

    def observe(self, drafting: bool, seconds: float) -> None:
        if seconds <= 0.0:
            return
        if drafting:
            self.verify_s = self._mix(self.verify_s, self.verify_n, seconds)
            self.verify_n += 1
        else:
            self.plain_s = self._mix(self.plain_s, self.plain_n, seconds)
            self.plain_n += 1

    def _mix(self, mean: float, count: int, value: float) -> float:
        return value if count == 0 else self.decay * mean + (1.0 - self.decay) * value

    def break_even_gain(self) -> float | None:
        """Expected accepted tokens per row that make a drafting step pay, or None until both
        kinds have `min_samples` measurements."""
        if self.verify_n < self.min_samples or self.plain_n < self.min_samples:
            return None
        return max(0.0, self.verify_s / self.plain_s - 1.0)
