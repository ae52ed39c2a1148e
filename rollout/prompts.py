"""Where prompts come from: a stable key, token ids, a label, and free-form metadata.

The controller takes candidates in epoch order and may hand some back (the planner defers
them); skipped candidates count as visited for the epoch. `ListPromptSource` cycles a fixed list
with a seeded shuffle per epoch, which is what the bench and the local trainer use; the slime
plugin adapts slime's data source instead.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(slots=True)
class PromptItem:
    key: str
    prompt_ids: list[int]
    label: Any = None
    prompt_text: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


class PromptSource(Protocol):
    def take(self, count: int) -> list[PromptItem]:
        """Up to `count` next prompts (fewer only if the source is exhausted)."""
        ...

    def give_back(self, items: Sequence[PromptItem]) -> None:
        """Returns untouched prompts to the front, in order."""
        ...


class ListPromptSource:
    """Cycles `items` forever, reshuffled (seeded) each epoch; `epoch` counts passes."""

    def __init__(self, items: Sequence[PromptItem], seed: int = 0, shuffle: bool = True) -> None:
        if not items:
            raise ValueError("prompts: the prompt list is empty")
        keys = [item.key for item in items]
        if len(set(keys)) != len(keys):
            raise ValueError("prompts: prompt keys must be unique")
        self.items = list(items)
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = -1
        self._queue: deque[PromptItem] = deque()
        self._returned: deque[PromptItem] = deque()

    def _refill(self) -> None:
        self.epoch += 1
        order = list(self.items)
        if self.shuffle:
            random.Random(f"{self.seed}-{self.epoch}").shuffle(order)
        self._queue.extend(order)

    def take(self, count: int) -> list[PromptItem]:
        out: list[PromptItem] = []
        while len(out) < count:
            if self._returned:
                out.append(self._returned.popleft())
                continue
            if not self._queue:
                self._refill()
            out.append(self._queue.popleft())
        return out

    def give_back(self, items: Sequence[PromptItem]) -> None:
        self._returned.extendleft(reversed(list(items)))

    def state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "queue": [i.key for i in self._queue],
            "returned": [i.key for i in self._returned],
        }

    def restore(self, state: dict[str, Any]) -> None:
        by_key = {i.key: i for i in self.items}
        self.epoch = state["epoch"]
        self._queue = deque(by_key[k] for k in state["queue"])
        self._returned = deque(by_key[k] for k in state["returned"])
