"""DAPO's dynamic filter as slime loads it (`--dynamic-sampling-filter-path`), and the adapter that
runs any slime filter inside the controller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rollout_accel.rollout.sample_types import Sample

try:  # pragma: no cover - exercised only where slime is installed
    from slime.rollout.filter_hub.base_types import DynamicFilterOutput
except ImportError:

    @dataclass
    class DynamicFilterOutput:  # type: ignore[no-redef]
        """The fallback of slime.rollout.filter_hub.base_types.DynamicFilterOutput."""

        keep: bool
        reason: str | None = None
        keep_when_insufficient: bool = False


# -- dynamic filter ------------------------------------------------------------------------------
def nonzero_std_filter(args: Any, samples: list[Sample], **kwargs: Any) -> DynamicFilterOutput:
    """DAPO's filter (`--dynamic-sampling-filter-path`): keep a group whose rewards are not all
    equal; the drop reason is `zero_std_<reward>` as slime's own filter names it."""
    key = getattr(args, "reward_key", None) if args is not None else None
    rewards = [float(s.reward[key]) if key else float(s.reward) for s in samples]
    keep = len(rewards) > 1 and max(rewards) - min(rewards) > 1e-6
    return DynamicFilterOutput(
        keep=keep, reason=None if keep else f"zero_std_{round(rewards[0], 1)}"
    )


class _FilterAdapter:
    """A slime dynamic filter as the controller's `group_filter`, counting drop reasons."""

    def __init__(self, args: Any, fn: Callable[..., Any]) -> None:
        self.args, self.fn = args, fn
        self.drops: dict[str, int] = {}

    def __call__(self, samples: list[Sample]) -> bool:
        out = self.fn(self.args, samples)
        keep, reason = (out.keep, out.reason) if hasattr(out, "keep") else (out, None)
        if not keep and reason:
            self.drops[reason] = self.drops.get(reason, 0) + 1
        return bool(keep)
