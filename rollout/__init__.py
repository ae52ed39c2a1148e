"""The RL-facing layer: rollout controller, engine pool, slime plugin, trainer, tasks, CLI."""
