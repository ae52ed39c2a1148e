"""Slot allocation for the paged KV cache, and the per-request tables of slots and token ids.

The pool is token-granular (page_size 1, as SGLang's default): a sequence's tokens may live in any
slots, and `slots[row, t]` names the slot of its token t; the attention kernels read the device
copy of that table as their block table. A token-level pool lets the radix cache share any prefix
length.

`RequestTable` keeps the slot table twice: a host mirror (numpy) that the scheduler reads and
writes without ever waiting for the GPU, and the device table the kernels read. Host writes are
queued and applied to the device in one scatter at the start of the next launch, so they land in
stream order after every step already queued (overlapped steps included). The table also holds
each row's token ids on the device: a step writes the token it samples at position t into
`token_ids[row, t]`, and the next decode step reads its input from there, so sampled tokens never
round-trip through the host before the next step can be queued.
"""

from __future__ import annotations

import numpy as np
import torch


class OutOfSlotsError(RuntimeError):
    """Not enough free KV slots; the scheduler evicts cache or preempts and tries again."""


class SlotAllocator:
    """Free-list of KV slots. Slot 0 is reserved as a harmless write target for padding."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 2:
            raise ValueError(f"max_total_tokens: need at least 2 KV slots, got {num_slots}")
        self.num_slots = num_slots
        self.reset()

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def capacity(self) -> int:
        return self.num_slots - 1

    @property
    def num_used(self) -> int:
        return self.capacity - self._num_free

    def alloc(self, count: int) -> torch.Tensor:
        """`count` free slots as an int64 CPU tensor."""
        if count > self._num_free:
            raise OutOfSlotsError(f"need {count} KV slots, {self._num_free} free")
        start = self._num_free - count
        slots = torch.from_numpy(self._free[start : self._num_free].copy())
        self._num_free = start
        return slots

    def free(self, slots: torch.Tensor | np.ndarray) -> None:
        values = slots.numpy() if isinstance(slots, torch.Tensor) else slots
        count = int(values.size)
        if count == 0:
            return
        end = self._num_free + count
        if end > self.num_slots - 1:
            raise AssertionError("freed more KV slots than were allocated")
        self._free[self._num_free : end] = values
        self._num_free = end

    def reset(self) -> None:
        self._free = np.arange(1, self.num_slots, dtype=np.int64)
        self._num_free = self.num_slots - 1


class RequestTable:
    """Per-row state on the device: the slot table (with a host mirror), token ids, and each
    row's sampling parameters; rows are recycled.

    Row `pad_row` (the last) is never handed out: padded batch rows point at it, so anything a
    padding row writes lands there. Invariant: after `flush()`, `req_to_token[r, :n] ==
    host_slots[r, :n]` for every position written through `write`; positions a batch computes
    are written on the device by the runner from the batch itself (`note` keeps the mirror).
    """

    def __init__(self, max_rows: int, max_context: int, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.max_rows = max_rows
        self.pad_row = max_rows
        self.max_context = max_context
        rows = max_rows + 1
        self.host_slots = np.zeros((rows, max_context), dtype=np.int32)
        self.req_to_token = torch.zeros((rows, max_context), dtype=torch.int32, device=device)
        # One spare column: a step may sample the token after a full context (then discarded).
        self.token_ids = torch.zeros((rows, max_context + 1), dtype=torch.int64, device=device)
        # Sampling parameters by row: (temperature or 0 for greedy, top_p, min_p) and
        # (top_k, seed, prompt length); set when a request takes the row.
        self.row_floats = torch.zeros((rows, 3), dtype=torch.float32, device=device)
        self.row_ints = torch.zeros((rows, 3), dtype=torch.int64, device=device)
        self._free_rows = list(range(max_rows - 1, -1, -1))
        self._pending: list[tuple[int, int, np.ndarray]] = []
        self._pending_params: dict[
            int, tuple[tuple[float, float, float], tuple[int, int, int]]
        ] = {}

    @property
    def num_free(self) -> int:
        return len(self._free_rows)

    def alloc(self) -> int:
        if not self._free_rows:
            raise OutOfSlotsError("no free request rows")
        return self._free_rows.pop()

    def free(self, row: int) -> None:
        self._free_rows.append(row)

    def set_row_params(
        self, row: int, floats: tuple[float, float, float], ints: tuple[int, int, int]
    ) -> None:
        """A request's sampling parameters for `row`; reach the device at `flush`."""
        self._pending_params[row] = (floats, ints)

    def write(self, row: int, start: int, slots: torch.Tensor | np.ndarray) -> None:
        """Slots of tokens [start, start + len(slots)) of `row`; reach the device at `flush`."""
        values = slots.numpy() if isinstance(slots, torch.Tensor) else slots
        if values.size == 0:
            return
        self.host_slots[row, start : start + values.size] = values
        self._pending.append((row, start, values))

    def note(self, row: int, start: int, slots: torch.Tensor | np.ndarray) -> None:
        """Host mirror only: the runner writes these slots on the device with its batch."""
        values = slots.numpy() if isinstance(slots, torch.Tensor) else slots
        self.host_slots[row, start : start + values.size] = values

    def note_positions(self, rows: np.ndarray, positions: np.ndarray, slots: np.ndarray) -> None:
        """Host mirror only, one slot per (row, position) pair (a decode step's new tokens)."""
        self.host_slots[rows, positions] = slots

    def read(self, row: int, start: int, end: int) -> torch.Tensor:
        """Slots of tokens [start, end) of `row`, as an int64 CPU tensor (from the host mirror)."""
        return torch.from_numpy(self.host_slots[row, start:end].astype(np.int64))

    def flush(self) -> None:
        """Applies queued host writes (slots written outside a batch, new rows' sampling
        parameters) to the device; non-blocking, in stream order."""
        if self._pending:
            rows_l, pos_l, val_l = [], [], []
            for row, start, values in self._pending:
                rows_l.append(np.full(values.size, row, dtype=np.int64))
                pos_l.append(np.arange(start, start + values.size, dtype=np.int64))
                val_l.append(values.astype(np.int64, copy=False))
            self._pending.clear()
            rows_a, pos_a, val_a = _last_writes(
                np.concatenate(rows_l), np.concatenate(pos_l), np.concatenate(val_l)
            )
            packed = self._to_device(np.stack([rows_a, pos_a, val_a]))
            self.req_to_token[packed[0], packed[1]] = packed[2].to(torch.int32)
        if self._pending_params:
            rows = np.fromiter(self._pending_params, np.int64, len(self._pending_params))
            values = list(self._pending_params.values())
            self._pending_params.clear()
            ints = np.array([v[1] for v in values], dtype=np.int64)
            floats = np.array([v[0] for v in values], dtype=np.float32)
            packed = self._to_device(np.concatenate([rows[:, None], ints], axis=1))
            rows_t = packed[:, 0]
            self.row_ints[rows_t] = packed[:, 1:]
            self.row_floats[rows_t] = self._to_device(floats)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor


def _last_writes(
    rows: np.ndarray, positions: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The queued writes with each (row, position) once, holding its latest value.

    Why: an indexed assignment with repeated indices keeps an unspecified one of them on a GPU
    (the CPU happens to keep the last). A row's pending writes can repeat positions — a
    finished request's canonical prefix, then the next request's prefix in the recycled row —
    and an older one winning points a sequence at another sequence's KV.
    """
    keys = rows * (int(positions.max()) + 1) + positions
    # np.unique keeps the first occurrence: take it over the reversed order, i.e. the last write.
    _, first_in_reversed = np.unique(keys[::-1], return_index=True)
    keep = keys.size - 1 - first_in_reversed
    return rows[keep], positions[keep], values[keep]
