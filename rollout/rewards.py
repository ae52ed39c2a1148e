"""Rewards: an async interface, verifiable built-ins, and slime's --custom-rm-path signature.

A reward function takes a finished Sample and returns a float (or a dict, with `reward_key`
naming the scalar the group statistics use). NaN, inf and missing values are errors naming the
sample: a silently bad reward poisons every advantage in its group.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any

from rollout_accel.rollout.sample_types import Sample

RewardFn = Callable[[Sample], Awaitable[float | dict[str, Any]]]


class RewardError(ValueError):
    """A reward function failed or returned something unusable."""


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_final_number(text: str) -> float | None:
    """The answer of a math response: \\boxed{...} if present, else the last number."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    source = boxed[-1] if boxed else text
    numbers = _NUMBER.findall(source.replace(",", ""))
    return float(numbers[-1]) if numbers else None


async def exact_match(sample: Sample) -> float:
    """1.0 when the stripped response equals the label."""
    return float(sample.label is not None and sample.response.strip() == str(sample.label).strip())


async def numeric_answer(sample: Sample) -> float:
    """1.0 when the response's final number equals the label's (to 1e-6)."""
    if sample.label is None:
        return 0.0
    got = extract_final_number(sample.response)
    want = extract_final_number(str(sample.label))
    return float(
        got is not None and want is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want))
    )


BUILTIN_REWARDS: dict[str, RewardFn] = {"exact_match": exact_match, "numeric": numeric_answer}


def load_reward(spec: str | RewardFn, args: Any = None) -> RewardFn:
    """A built-in name, a callable, or a dotted path `pkg.module.fn`. A slime-style
    `async rm(args, sample, **kwargs)` is adapted by binding `args`."""
    if callable(spec):
        fn: Callable[..., Any] = spec
    elif spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    else:
        module_name, _, attr = str(spec).rpartition(".")
        if not module_name:
            raise RewardError(
                f"reward: {spec!r} is neither a built-in ({sorted(BUILTIN_REWARDS)}) nor a dotted path"
            )
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise RewardError(f"reward: cannot load {spec!r} ({exc})") from exc
    params = list(inspect.signature(fn).parameters)
    if len(params) >= 2 and params[0] == "args":
        slime_fn = fn

        async def bound(sample: Sample) -> float | dict[str, Any]:
            return await slime_fn(args, sample)

        return bound
    return fn


def reward_value(reward: Any, reward_key: str | None, where: str) -> float:
    """The scalar of a reward, checked; raises RewardError naming `where`."""
    if isinstance(reward, dict):
        if reward_key is None or reward_key not in reward:
            raise RewardError(f"{where}: reward is a dict without reward_key {reward_key!r}")
        reward = reward[reward_key]
    if reward is None:
        raise RewardError(f"{where}: reward is missing")
    if isinstance(reward, bool) or not isinstance(reward, int | float):
        raise RewardError(f"{where}: reward {reward!r} is not a number")
    if not math.isfinite(reward):
        raise RewardError(f"{where}: reward is {reward}")
    return float(reward)
