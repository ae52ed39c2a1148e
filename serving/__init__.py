"""The inference engine: models, paged KV with radix prefix cache, continuous batching, and the
SGLang-protocol HTTP server. Imports `rollout_accel.kernels` and nothing else of ours."""
