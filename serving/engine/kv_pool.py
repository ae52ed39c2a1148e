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
    """Per-row slot table (host mirror + device copy) and device token ids; rows are recycled.

    Invariant: after `flush()`, `device_slots[r, :n] == host_slots[r, :n]` for every row r and
    every position n written through `write`.
    """

    def __init__(self, max_rows: int, max_context: int, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.max_rows = max_rows
        self.max_context = max_context
        self.host_slots = np.zeros((max_rows, max_context), dtype=np.int32)
        self.req_to_token = torch.zeros((max_rows, max_context), dtype=torch.int32, device=device)
        # One spare column: a step may sample the token after a full context (then discarded).
        self.token_ids = torch.zeros((max_rows, max_context + 1), dtype=torch.int64, device=device)
        self._free_rows = list(range(max_rows - 1, -1, -1))
        self._pending: list[tuple[int, int, np.ndarray]] = []

    @property
    def num_free(self) -> int:
        return len(self._free_rows)

    def alloc(self) -> int:
        if not self._free_rows:
            raise OutOfSlotsError("no free request rows")
        return self._free_rows.pop()

    def free(self, row: int) -> None:
        self._free_rows.append(row)

    def write(self, row: int, start: int, slots: torch.Tensor | np.ndarray) -> None:
        """Slots of tokens [start, start + len(slots)) of `row`; reaches the device at `flush`."""
        values = slots.numpy() if isinstance(slots, torch.Tensor) else slots
        if values.size == 0:
            return
        self.host_slots[row, start : start + values.size] = values
        self._pending.append((row, start, values))

    def write_positions(self, rows: np.ndarray, positions: np.ndarray, slots: np.ndarray) -> None:
        """One slot per (row, position) pair, e.g. a decode step's new tokens."""
        self.host_slots[rows, positions] = slots
        self._pending.append((-1, 0, np.stack([rows, positions, slots.astype(np.int64)])))

    def read(self, row: int, start: int, end: int) -> torch.Tensor:
        """Slots of tokens [start, end) of `row`, as an int64 CPU tensor (from the host mirror)."""
        return torch.from_numpy(self.host_slots[row, start:end].astype(np.int64))

    def flush(self) -> None:
        """Applies queued host writes to the device table with one scatter (non-blocking)."""
        if not self._pending:
            return
        rows_l, pos_l, val_l = [], [], []
        for row, start, values in self._pending:
            if row < 0:
                rows_l.append(values[0])
                pos_l.append(values[1])
                val_l.append(values[2])
            else:
                rows_l.append(np.full(values.size, row, dtype=np.int64))
                pos_l.append(np.arange(start, start + values.size, dtype=np.int64))
                val_l.append(values.astype(np.int64, copy=False))
        self._pending.clear()
        packed = torch.from_numpy(
            np.stack([np.concatenate(rows_l), np.concatenate(pos_l), np.concatenate(val_l)])
        )
        if self.device.type == "cuda":
            packed = packed.pin_memory().to(self.device, non_blocking=True)
        self.req_to_token[packed[0], packed[1]] = packed[2].to(torch.int32)

    def reallocate(self) -> None:
        """New device buffers (memory resume); the host mirror is re-sent on the next flush."""
        self.req_to_token = torch.zeros_like(self.req_to_token)
        self.token_ids = torch.zeros_like(self.token_ids)
