"""Slot allocation for the paged KV cache, and the request -> slot table.

The pool is token-granular (page_size 1, as SGLang's default): a sequence's tokens may live in any
slots, and `req_to_token[row, t]` names the slot of its token t; the attention kernels read that
table as their block table. A token-level pool lets the radix cache share any prefix length.
"""

from __future__ import annotations

import torch


class OutOfSlotsError(RuntimeError):
    """Not enough free KV slots; the scheduler evicts cache or preempts and tries again."""


class SlotAllocator:
    """Free-list of KV slots. Slot 0 is reserved as a harmless write target for padding."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 2:
            raise ValueError(f"max_total_tokens: need at least 2 KV slots, got {num_slots}")
        self.num_slots = num_slots
        self._free = torch.arange(1, num_slots, dtype=torch.int64)
        self._num_free = num_slots - 1

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def capacity(self) -> int:
        return self.num_slots - 1

    def alloc(self, count: int) -> torch.Tensor:
        if count > self._num_free:
            raise OutOfSlotsError(f"need {count} KV slots, {self._num_free} free")
        start = self._num_free - count
        slots = self._free[start : self._num_free].clone()
        self._num_free = start
        return slots

    def free(self, slots: torch.Tensor) -> None:
        count = int(slots.numel())
        if count == 0:
            return
        end = self._num_free + count
        if end > self.num_slots - 1:
            raise AssertionError("freed more KV slots than were allocated")
        self._free[self._num_free : end] = slots.to(self._free.device, torch.int64)
        self._num_free = end

    def reset(self) -> None:
        self._free = torch.arange(1, self.num_slots, dtype=torch.int64)
        self._num_free = self.num_slots - 1


class RequestTable:
    """`req_to_token[row, t]`: the slot of token t of the request in `row`; rows are recycled."""

    def __init__(self, max_rows: int, max_context: int, device: torch.device | str) -> None:
        self.req_to_token = torch.zeros((max_rows, max_context), dtype=torch.int32, device=device)
        self._free_rows = list(range(max_rows - 1, -1, -1))
        self.max_context = max_context

    @property
    def num_free(self) -> int:
        return len(self._free_rows)

    def alloc(self) -> int:
        if not self._free_rows:
            raise OutOfSlotsError("no free request rows")
        return self._free_rows.pop()

    def free(self, row: int) -> None:
        self._free_rows.append(row)

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        self.req_to_token[row, start : start + slots.numel()] = slots.to(
            self.req_to_token.device, torch.int32
        )

    def read(self, row: int, start: int, end: int) -> torch.Tensor:
        """Slots of tokens [start, end) of `row`, as a CPU int64 tensor (the allocator and the
        radix cache keep slot ids on the host)."""
        return self.req_to_token[row, start:end].to("cpu", torch.int64)
