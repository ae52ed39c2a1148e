"""slime plugin: the rollout function, data source and dynamic filter slime loads by dotted path.

    --rollout-function-path        rollout_accel.rollout.slime.generate_rollout
    --data-source-path             rollout_accel.rollout.slime.DataSource
    --dynamic-sampling-filter-path rollout_accel.rollout.slime.nonzero_std_filter
    --custom-config-path           a YAML of `accel_*` keys (rollout/slime_settings.py)

slime calls `generate_rollout` synchronously inside its RolloutManager Ray actor. The engine pool,
controller, partial buffer and history must outlive one call, and aiohttp sessions and SQLite
connections belong to the loop / thread that made them, so everything runs on one background
event loop owned by a module-level singleton (as slime's own `run()` helper does); the actor
thread only submits work to it and waits.

One train call: list the router's workers -> dispatch through the RolloutController (prompts
from slime's data source, groups of slime Samples filled in place) -> exactly
`rollout_batch_size` groups of `n_samples_per_prompt`, sorted by sample index as slime does.
With our `DataSource`, partial groups and the history are saved and loaded with slime's
checkpoints; with another data source they live in memory only.
"""

from __future__ import annotations

from rollout_accel.rollout.slime.background import shutdown
from rollout_accel.rollout.slime.data_source import DataSource, SlimePromptSource
from rollout_accel.rollout.slime.filters import DynamicFilterOutput, nonzero_std_filter
from rollout_accel.rollout.slime.rollout_function import generate_rollout

__all__ = [
    "DataSource",
    "DynamicFilterOutput",
    "SlimePromptSource",
    "generate_rollout",
    "nonzero_std_filter",
    "shutdown",
]
