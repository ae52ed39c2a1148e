"""Chained addition/subtraction with a running-sum scratchpad.

Prompt `12+7-5=`; solution `12+7=19,19-5=14#14`. One scratchpad entry per operation, so the
response length grows linearly with the number of steps, and the step count is drawn per prompt
from a power law (see `difficulty.py`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rollout_accel.rollout.tasks.base import ANSWER_MARK, Problem, Task
from rollout_accel.rollout.tasks.difficulty import check_power_law, draw_difficulty

_SUPPORTED_OPERATORS = "+-"


@dataclass(frozen=True, slots=True)
class ArithmeticConfig:
    """Problem distribution: `steps` operations on operands in [0, max_operand].

    `tail_alpha` is the power-law exponent of the step count (0 = uniform).
    """

    min_steps: int = 1
    max_steps: int = 6
    tail_alpha: float = 1.5
    max_operand: int = 20
    operators: str = "+-"

    def __post_init__(self) -> None:
        check_power_law(self.min_steps, self.max_steps, self.tail_alpha, "ArithmeticConfig steps")
        if not isinstance(self.max_operand, int) or self.max_operand < 1:
            raise ValueError(
                f"ArithmeticConfig: max_operand must be an int >= 1, got {self.max_operand!r}"
            )
        if not self.operators or any(op not in _SUPPORTED_OPERATORS for op in self.operators):
            raise ValueError(
                f"ArithmeticConfig: operators must be a non-empty subset of {_SUPPORTED_OPERATORS!r}, "
                f"got {self.operators!r}"
            )


class ArithmeticTask(Task):
    """Evaluate `a op b op c ...` left to right; difficulty = number of operations."""

    name = "arithmetic"

    def __init__(self, config: ArithmeticConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else ArithmeticConfig()

    def _draw(self, rng: random.Random) -> Problem:
        cfg = self.config
        steps = draw_difficulty(rng, cfg.min_steps, cfg.max_steps, cfg.tail_alpha)
        operands = [rng.randint(0, cfg.max_operand) for _ in range(steps + 1)]
        operators = [rng.choice(cfg.operators) for _ in range(steps)]
        return make_problem(operands, operators)


def make_problem(operands: list[int], operators: list[str]) -> Problem:
    """The problem (with its worked solution) for one chain; `len(operands) == len(operators) + 1`."""
    if len(operands) != len(operators) + 1 or not operators:
        raise ValueError(
            f"arithmetic: need k >= 1 operators and k + 1 operands, got {len(operators)} and {len(operands)}"
        )
    prompt = (
        str(operands[0])
        + "".join(f"{op}{x}" for op, x in zip(operators, operands[1:], strict=True))
        + "="
    )
    total = operands[0]
    lines = []
    for op, x in zip(operators, operands[1:], strict=True):
        new_total = total + x if op == "+" else total - x
        lines.append(f"{total}{op}{x}={new_total}")
        total = new_total
    answer = str(total)
    return Problem(
        prompt=prompt,
        answer=answer,
        solution=",".join(lines) + ANSWER_MARK + answer,
        difficulty=len(operators),
        key=prompt,
    )
