"""Prefill/decode SM sharing on one GPU: green-context partitions (`partitions`), the per-step
split choice (`planner`, profiled by `profile`), and the runner that runs a mixed step's decode
and prefill concurrently on disjoint SMs (`concurrent_step.SmShareRunner`, replaying graphs
captured on the partitions' streams: the decode graphs and `prefill_graphs.PrefillGraphs`).

Off by default (`EngineConfig.sm_share`); wherever green contexts are missing the engine runs as
today. Import the submodules directly (they import the engine's runner).
"""
