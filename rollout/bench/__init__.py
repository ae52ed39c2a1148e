"""`rollout bench`: policy comparison on real engines, workloads, reports."""
