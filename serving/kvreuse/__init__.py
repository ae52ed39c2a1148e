"""Cross-agent KV reuse with per-layer selective recompute (CacheBlend-style).

chunk_store  chunk KV by token content in the paged pool (lock refs, LRU, exact slot ownership)
rerotate     which rotary variants can be moved to new positions; placing a chunk's KV
segments     how a client marks segments (`segments` field of /generate, or a separator)
plan         segment lookups -> reused spans (locked) and misses to store
blend        selective-recompute prefill over the model into the request's slots
prefiller    one prompt end to end: radix prefix, plan, blend or full prefill, store, finish
quality      KL / top-1 / greedy agreement against full prefill
workload     multi-agent prompts (instructions + other agents' outputs + shared documents)
"""
