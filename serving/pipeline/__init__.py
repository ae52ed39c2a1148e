"""Pipeline-parallel serving: `pp_size` stage processes, each owning a contiguous layer range,
with an online stage-latency predictor and a rebalancer that moves layers between stages.

Stage 0 (the engine's process) runs the scheduler, the embedding and its layers; the last stage
runs the final norm, the LM head and the sampler. See `runner.py` for a step's walk.
"""
