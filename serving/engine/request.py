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

from rollout_accel.serving.engine.errors import InvalidRequestError
from rollout_accel.serving.engine.grammar import GrammarState
from rollout_accel.serving.engine.logprob_options import ExtraLogprobs
from rollout_accel.serving.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Request:
    """Everything the scheduler tracks for one sequence.

    Invariants: `num_computed` tokens of the sequence have their KV in (or queued for) slots
    `slots[row, :num_computed]`; the first `prefix_len` of those belong to the radix cache (locked
    through `prefix_node`), the rest to this request. `inflight` tokens were sampled by launched
    steps whose results are not processed yet: the sequence is `fill_ids` plus those.
    `logprob_start_len` is -1 unless return_logprob asks for prompt logprobs; `input_logprobs[p]`
    is prompt token p's logprob (None where nothing predicted it); `extra_logprobs` is set only
    with return_logprob and SGLang's top_logprobs_num / token_ids_logprob.
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
    extra_logprobs: ExtraLogprobs | None = None
    grammar: GrammarState | None = None
    # KV reuse (serving/kvreuse): [start, end) prompt ranges to reuse, and what the prefill did.
    segments: list[tuple[int, int]] = field(default_factory=list)
    reuse_info: dict[str, Any] | None = None

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
    inflight: int = 0
    error: dict[str, Any] | None = None
    detok: Any = None  # incremental detokenizer state (streams and stop strings only)

    def __post_init__(self) -> None:
        if not self.return_logprob:
            self.logprob_start_len = -1  # SGLang ignores it without return_logprob
            self.extra_logprobs = None
        elif self.logprob_start_len > len(self.input_ids):
            raise InvalidRequestError(
                f"logprob_start_len: {self.logprob_start_len} is past the prompt's "
                f"{len(self.input_ids)} tokens"
            )

    @property
    def prefix_match_limit(self) -> int:
        """How many leading tokens the prefix cache may supply: all but the newest, and none from
        logprob_start_len on (their prompt logprobs must be computed, SGLang's rule too)."""
        if self.logprob_start_len >= 0:
            return min(self.fill_len - 1, self.logprob_start_len)
        return self.fill_len - 1

    def record_input_logprobs(self, first_position: int, values: list[float]) -> None:
        """Stores prompt logprobs by position (a recomputation after retraction overwrites)."""
        end = first_position + len(values)
        if len(self.input_logprobs) < end:
            self.input_logprobs.extend([None] * (end - len(self.input_logprobs)))
        self.input_logprobs[first_position:end] = values

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
    def seq_len(self) -> int:
        """Tokens of the sequence, counting those sampled by steps not processed yet."""
        return len(self.input_ids) + len(self.output_ids) + self.inflight

    @property
    def decode_ready(self) -> bool:
        """Prompt done and KV exists for all but the newest token, which the next step feeds;
        and the request will not be finished by the tokens already sampled."""
        return (
            self.status is RequestStatus.RUNNING
            and self.num_computed == self.seq_len - 1
            and len(self.output_ids) + self.inflight < self.params.max_new_tokens
        )

    @property
    def needs_host_history(self) -> bool:
        """Sampling its next token needs its output so far on the host (penalties count output
        tokens; a grammar advances over them), so it cannot be scheduled while a token of it is
        still in flight."""
        return self.params.has_penalties or self.grammar is not None

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def remaining_prefill(self) -> int:
        return self.fill_len - self.num_computed
