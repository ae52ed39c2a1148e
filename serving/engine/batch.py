"""What one engine step is made of: the scheduler's batch, the runner's handle, the step result.

The step pipeline is `batch = scheduler.schedule()` -> `handle = runner.launch(batch)` ->
`scheduler.process(handle)`. Synchronous mode processes right after launching; overlap mode
launches step N+1 before processing step N. These types are all that passes between the three.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from rollout_accel.serving.engine.request import Request


@dataclass(slots=True)
class ForwardItem:
    """Compute KV for positions [start, start + count) of `request`'s sequence.

    `emits_token`: the item reaches the end of the sequence as scheduled, so the step samples the
    token at position start + count (the last chunk of a prefill, or a decode row). A decode row's
    input token is read on the device (the previous step wrote it there); a prefill row's inputs
    are `request`'s host-known ids.
    """

    request: Request
    start: int
    count: int
    emits_token: bool
    is_prefill: bool
    wants_input_logprobs: bool = False
    draft: list[int] | None = None  # a verify row: count = 1 + len(draft) (serving/spec)


@dataclass(slots=True)
class Batch:
    """One forward step: the first `num_decode` items are single-token decode rows.

    `slots` holds the KV slot of every computed token, item after item, in order.
    """

    items: list[ForwardItem]
    slots: torch.Tensor
    num_decode: int
    num_tokens: int = 0
    rows: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    @property
    def is_decode_only(self) -> bool:
        return self.num_decode == len(self.items)


@dataclass(slots=True)
class PackedLayout:
    """A batch's tokens packed item after item: item i computes positions
    [starts[i], ends[i]) as packed tokens [cu[i], cu[i + 1])."""

    starts: np.ndarray
    counts: np.ndarray
    ends: np.ndarray
    cu: np.ndarray
    positions: np.ndarray  # [total] the sequence position of every packed token

    @property
    def total(self) -> int:
        return int(self.cu[-1])


def upload_packed(arrays: list[np.ndarray], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Int64 host arrays to `device` as ONE pinned, non-blocking copy of their concatenation
    (one transfer a step instead of one per array); returns the views, in order."""
    packed = torch.from_numpy(np.concatenate(arrays))
    if device.type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    return torch.split(packed, [a.size for a in arrays])


def pack_layout(items: list[ForwardItem]) -> PackedLayout:
    """The packed layout of `items` (vectorised: no per-token Python work)."""
    n = len(items)
    starts = np.fromiter((it.start for it in items), np.int64, n)
    counts = np.fromiter((it.count for it in items), np.int64, n)
    cu = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=cu[1:])
    positions = np.repeat(starts - cu[:-1], counts) + np.arange(int(cu[-1]), dtype=np.int64)
    return PackedLayout(starts, counts, starts + counts, cu, positions)


def host_input_ids(items: list[ForwardItem], layout: PackedLayout, first: int) -> np.ndarray:
    """Input ids of the packed tokens of items[first:] (prefill rows: known on the host); the
    tokens of earlier items (decode rows, read from the device token table) are left 0."""
    ids = np.zeros(layout.total, dtype=np.int64)
    cu = layout.cu
    for index in range(first, len(items)):
        it = items[index]
        ids[int(cu[index]) : int(cu[index + 1])] = it.request.token_slice(
            it.start, it.start + it.count
        )
    return ids


@dataclass(slots=True)
class StepResult:
    """What a step produced: one sampled token (and its logprob) per emitting item, in item
    order, and prompt logprobs by item index for items that asked for them."""

    tokens: list[int]
    logprobs: list[float]
    input_logprobs: dict[int, list[float]] = field(default_factory=dict)
    # Verify rows: item index -> the tokens (and logprobs) emitted after `tokens`' entry.
    extra: dict[int, tuple[list[int], list[float]]] = field(default_factory=dict)


class StepHandle(Protocol):
    """A launched step; `wait()` blocks until its results are on the host."""

    batch: Batch

    def wait(self) -> StepResult: ...


@dataclass(slots=True)
class CompletedStep:
    """A step whose results were already on the host when `launch` returned (CPU runs)."""

    batch: Batch
    result: StepResult

    def wait(self) -> StepResult:
        return self.result


class QueuedStep:
    """A step queued on the GPU: results land in pinned host memory (`host`, [2, count] float64:
    tokens, logprobs), then an event fires. `wait()` is idempotent."""

    def __init__(
        self,
        batch: Batch,
        host: torch.Tensor,
        event: torch.cuda.Event,
        count: int,
        input_logprobs: dict[int, list[float]] | None = None,
    ) -> None:
        self.batch = batch
        self._host = host
        self._event = event
        self._count = count
        self._input_logprobs = input_logprobs or {}
        self._result: StepResult | None = None

    def wait(self) -> StepResult:
        """Blocks until the results are on the host; later calls return the same result."""
        if self._result is None:
            self._event.synchronize()
            values = self._host.numpy()
            self._result = StepResult(
                values[0].astype(np.int64).tolist(), values[1].tolist(), self._input_logprobs
            )
        return self._result
