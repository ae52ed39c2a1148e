"""Task names to task objects: `get_task("arithmetic", max_steps=4)`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from rollout_accel.rollout.tasks.arithmetic import ArithmeticConfig, ArithmeticTask
from rollout_accel.rollout.tasks.base import Task
from rollout_accel.rollout.tasks.sorting import SortingConfig, SortingTask

_REGISTRY: dict[str, tuple[type, Callable[[Any], Task]]] = {
    "arithmetic": (ArithmeticConfig, ArithmeticTask),
    "sorting": (SortingConfig, SortingTask),
}
TASKS: tuple[str, ...] = tuple(_REGISTRY)


def get_task(name: str, **kwargs: Any) -> Task:
    """The task called `name`, its config built from `kwargs` (fields of its config dataclass).

    Raises ValueError for an unknown name, an unknown config field or a bad config value.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    config_cls, task_cls = _REGISTRY[name]
    fields = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ValueError(
            f"task {name!r} has no option {', '.join(map(repr, unknown))}; valid options: {', '.join(fields)}"
        )
    return task_cls(config_cls(**kwargs))


def task_config_class(name: str) -> type:
    """The config dataclass of task `name` (its fields are the task's options)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return _REGISTRY[name][0]
