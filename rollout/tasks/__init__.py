"""Verifiable toy tasks (arithmetic, sorting) with their own tokenizer, seeded data and rewards."""

from __future__ import annotations

from rollout_accel.rollout.tasks.arithmetic import ArithmeticConfig, ArithmeticTask
from rollout_accel.rollout.tasks.base import Problem, Task, split_of
from rollout_accel.rollout.tasks.registry import TASKS, get_task
from rollout_accel.rollout.tasks.sorting import SortingConfig, SortingTask
from rollout_accel.rollout.tasks.tokenizer import CharTokenizer

__all__ = [
    "TASKS",
    "ArithmeticConfig",
    "ArithmeticTask",
    "CharTokenizer",
    "Problem",
    "SortingConfig",
    "SortingTask",
    "Task",
    "get_task",
    "split_of",
]
