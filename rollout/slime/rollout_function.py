"""slime's rollout function (`--rollout-function-path rollout_accel.rollout.slime.generate_rollout`)."""

from __future__ import annotations

from typing import Any

from rollout_accel.rollout.sample_types import (
    RolloutFnEvalOutput,
    RolloutFnTrainOutput,
)
from rollout_accel.rollout.slime.background import _plugin


# -- the rollout function -----------------------------------------------------------------------
def generate_rollout(
    args: Any, rollout_id: int, data_source: Any, evaluation: bool = False
) -> RolloutFnTrainOutput | RolloutFnEvalOutput:
    """slime's rollout function (`--rollout-function-path`). Train: exactly
    `args.rollout_batch_size` groups of `args.n_samples_per_prompt` filled Samples, sorted by
    index, with metrics. Evaluation: slime's eval output over its eval datasets."""
    plugin = _plugin()
    runtime = plugin.runtime_for(args)
    if evaluation:
        return plugin.loop.run(runtime.evaluate(rollout_id))
    return plugin.loop.run(runtime.train(rollout_id, data_source))
