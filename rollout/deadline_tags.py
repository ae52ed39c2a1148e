"""Tag rollout requests that will be aborted at the step's target anyway, so engines run them last.

A partial-rollout step ends when `target` groups are accepted; whatever is still running then is
aborted (and resumed next step). A request dispatched late in the step whose predicted response
is long will not finish before that point: its prefill and decode now only compete with requests
that will finish. Such requests get a low SGLang `priority` (negative): our engine's `slo` policy
never promotes them and admits them only with spare prefill budget; `fcfs`/`lpm`/`hrrn` order by
priority first; real SGLang honours it with `--enable-priority-scheduling` (higher value first,
its default). Ordering never changes tokens, only when a request runs.

How a controller uses it (three calls, no engine change):

    tagger = AbortRiskTagger(target_groups=cfg.rollout_batch_size)
    tagger.start_step()                           # at the start of each rollout step
    tagger.group_accepted()                       # each time a group is accepted
    payload = tagger.tag(payload, predicted_tokens)   # before pool.generate(payload)

`predicted_tokens` is the response length still expected (e.g. the history planner's
`expected_length` minus what a resumed sample already has); `decode_tokens_per_s` is one
request's decode speed (tokens per second of a single sequence, as the engine reports it or as
measured from earlier steps). `RolloutController(payload_hook=tagger.payload_hook(predict))` wires
the tagging through the controller's existing hook.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

LOW_PRIORITY = -1


class AbortRiskTagger:
    """Predicts, per request, whether it finishes before the step reaches its target.

    The step's remaining time is extrapolated from its acceptance rate so far:
    (target - accepted) / (accepted / elapsed). A request is tagged when at least `late_fraction`
    of the target is accepted (earlier the rate says little) and its predicted decode time exceeds
    `slack` times that remaining time.
    """

    def __init__(
        self,
        target_groups: int,
        decode_tokens_per_s: float = 50.0,
        late_fraction: float = 0.5,
        slack: float = 1.0,
        low_priority: int = LOW_PRIORITY,
    ) -> None:
        if target_groups < 1:
            raise ValueError(f"target_groups: must be >= 1, got {target_groups}")
        if decode_tokens_per_s <= 0:
            raise ValueError(f"decode_tokens_per_s: must be > 0, got {decode_tokens_per_s}")
        if not 0.0 <= late_fraction <= 1.0:
            raise ValueError(f"late_fraction: must be in [0, 1], got {late_fraction}")
        if low_priority >= 0:
            raise ValueError(f"low_priority: must be negative, got {low_priority}")
        self.target_groups = target_groups
        self.decode_tokens_per_s = decode_tokens_per_s
        self.late_fraction = late_fraction
        self.slack = slack
        self.low_priority = low_priority
        self.accepted = 0
        self.step_start = time.perf_counter()
        self.tagged = 0

    def start_step(self, now: float | None = None) -> None:
        self.accepted = 0
        self.step_start = time.perf_counter() if now is None else now

    def group_accepted(self, count: int = 1) -> None:
        self.accepted += count

    def time_left(self, now: float | None = None) -> float | None:
        """Predicted seconds until the target is reached; None before the first acceptance."""
        now = time.perf_counter() if now is None else now
        elapsed = now - self.step_start
        if self.accepted <= 0 or elapsed <= 0:
            return None
        if self.accepted >= self.target_groups:
            return 0.0
        return (self.target_groups - self.accepted) * elapsed / self.accepted

    def will_be_aborted(self, predicted_tokens: float, now: float | None = None) -> bool:
        if self.accepted < self.late_fraction * self.target_groups:
            return False
        left = self.time_left(now)
        if left is None:
            return False
        return predicted_tokens / self.decode_tokens_per_s > self.slack * left

    def tag(
        self, payload: dict[str, Any], predicted_tokens: float | None, now: float | None = None
    ) -> dict[str, Any]:
        """Returns the payload with `priority` lowered when the request is predicted to be
        aborted; an explicit priority already in the payload is kept."""
        if predicted_tokens is None or "priority" in payload:
            return payload
        if not self.will_be_aborted(predicted_tokens, now):
            return payload
        self.tagged += 1
        return {**payload, "priority": self.low_priority}

    def payload_hook(
        self, predict: Callable[[Any], float | None]
    ) -> Callable[[Any, dict[str, Any]], dict[str, Any]]:
        """A `RolloutController(payload_hook=...)`: `predict(sample)` gives the tokens the sample
        is still expected to generate (None: unknown, left untagged)."""

        def hook(sample: Any, payload: dict[str, Any]) -> dict[str, Any]:
            return self.tag(payload, predict(sample))

        return hook
