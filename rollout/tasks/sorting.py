"""Sort a list of small numbers, optionally with a selection-sort scratchpad.

Prompt `sort 5,3,9,1=`; solution `#1,3,5,9`, or with the scratchpad
`1|5,3,9;3|5,9;5|9#1,3,5,9` (each step: the minimum taken, then what is left), whose length
grows quadratically with the list length. Difficulty = list length, drawn from a power law.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rollout_accel.rollout.tasks.base import ANSWER_MARK, Problem, Task
from rollout_accel.rollout.tasks.difficulty import check_power_law, draw_difficulty


@dataclass(frozen=True, slots=True)
class SortingConfig:
    """Problem distribution: lists of `min_len..max_len` integers in [0, max_value]."""

    min_len: int = 3
    max_len: int = 8
    tail_alpha: float = 1.0
    max_value: int = 9
    scratchpad: bool = True

    def __post_init__(self) -> None:
        check_power_law(self.min_len, self.max_len, self.tail_alpha, "SortingConfig lengths")
        if self.min_len < 2:
            raise ValueError(f"SortingConfig: min_len must be >= 2, got {self.min_len!r}")
        if not isinstance(self.max_value, int) or self.max_value < 1:
            raise ValueError(
                f"SortingConfig: max_value must be an int >= 1, got {self.max_value!r}"
            )


class SortingTask(Task):
    """Sort ascending; difficulty = number of items."""

    name = "sorting"

    def __init__(self, config: SortingConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else SortingConfig()

    def _draw(self, rng: random.Random) -> Problem:
        cfg = self.config
        length = draw_difficulty(rng, cfg.min_len, cfg.max_len, cfg.tail_alpha)
        values = [rng.randint(0, cfg.max_value) for _ in range(length)]
        return make_problem(values, scratchpad=cfg.scratchpad)


def make_problem(values: list[int], scratchpad: bool = True) -> Problem:
    """The problem (with its worked solution) for one list of at least two integers."""
    if len(values) < 2:
        raise ValueError(f"sorting: need at least 2 values, got {values!r}")
    prompt = "sort " + _join(values) + "="
    answer = _join(sorted(values))
    steps = []
    if scratchpad:
        rest = list(values)
        while len(rest) > 1:
            rest.remove(smallest := min(rest))
            steps.append(f"{smallest}|{_join(rest)}")
    return Problem(
        prompt=prompt,
        answer=answer,
        solution=";".join(steps) + ANSWER_MARK + answer,
        difficulty=len(values),
        key=prompt,
    )


def _join(values: list[int]) -> str:
    return ",".join(str(v) for v in values)
