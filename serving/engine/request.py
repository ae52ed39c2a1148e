"""A generation request and its lifecycle in the engine.

Lifecycle: WAITING -> (prefill, possibly in chunks) -> RUNNING (decode) -> FINISHED. A running
request may be retracted back to WAITING (preemption by recompute, or pause mode `retract`); it
keeps its output so far and resumes by prefilling prompt + output.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rollout_accel.serving.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Request:
    """Everything the scheduler tracks for one sequence.

    Invariants: `num_computed` tokens of `fill_ids` have their KV in slots
    `req_to_token[row, :num_computed]`; the first `prefix_len` of those belong to the radix cache
    (locked through `prefix_node`), the rest to this request.
    """

    rid: str
    input_ids: list[int]
    params: SamplingParams
    seed: int
    return_logprob: bool = False
    logprob_start_len: int = -1
    return_text_in_logprobs: bool = False
    stream: bool = False
    sink: Callable[[dict[str, Any], bool], None] | None = None
    priority: int = 0  # higher first; negative = deprioritised (never promoted by `slo`)
    ttft_slo_ms: float | None = None  # TTFT deadline for `slo` (our extension); None = default

    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    input_logprobs: list[float | None] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: dict[str, Any] | None = None

    row: int | None = None
    num_computed: int = 0
    prefix_len: int = 0
    prefix_node: Any = None
    cached_tokens: int = 0
    matched_once: bool = False
    retractions: int = 0

    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    weight_version: str = "default"
    text_sent: int = 0

    @property
    def fill_ids(self) -> list[int]:
        return self.input_ids + self.output_ids

    @property
    def fill_len(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """fill_ids[start:end] without building fill_ids (the decode hot path asks for one)."""
        prompt = len(self.input_ids)
        if start >= prompt:
            return self.output_ids[start - prompt : end - prompt]
        if end <= prompt:
            return self.input_ids[start:end]
        return self.input_ids[start:] + self.output_ids[: end - prompt]

    @property
    def in_decode(self) -> bool:
        """KV exists for all but the newest token, which the next step feeds."""
        return self.num_computed == self.fill_len - 1 and bool(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def remaining_prefill(self) -> int:
        return self.fill_len - self.num_computed
