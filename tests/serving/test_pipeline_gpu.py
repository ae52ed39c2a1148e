"""Pipeline parallelism on 2 GPUs (NCCL): pp = 2 gives pp = 1's greedy tokens, including across
layer moves (weights + KV over NCCL) with requests in flight.

Marked `gpu`, needs 2 GPUs: `bash scripts/gpu_tests.sh tests/serving/test_pipeline_gpu.py`.
"""

from __future__ import annotations

import threading

import pytest
import torch

from rollout_accel.serving.engine import Engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 NVIDIA GPUs"),
]

ARGS = dict(max_total_tokens=8192, max_running_requests=16)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18], [40, 41]]
GREEDY = {"temperature": 0, "max_new_tokens": 48, "ignore_eos": True}


def test_pp2_matches_pp1_across_layer_moves() -> None:
    with Engine("tiny-qwen3", **ARGS) as ref:
        expected = [
            o["output_ids"] for o in ref.generate(input_ids=PROMPTS, sampling_params=GREEDY)
        ]
    # One micro-batch: the same GEMM shapes as pp = 1 (bf16 results can depend on them).
    with Engine("tiny-qwen3", pp_size=2, pp_microbatches=1, **ARGS) as eng:
        runner = eng.runner
        out: dict = {}
        thread = threading.Thread(
            target=lambda: out.update(r=eng.generate(input_ids=PROMPTS, sampling_params=GREEDY))
        )
        thread.start()
        for bounds, at in (((0, 1, 4), 8), ((0, 3, 4), 24)):
            while runner.steps < at and thread.is_alive():
                thread.join(0.005)
            eng.loop.call(lambda b=bounds: runner.request_bounds(b))
        thread.join(120)
        assert [o["output_ids"] for o in out["r"]] == expected
        assert sum("layer" in t for t in runner.timeline) >= 3
        again = eng.generate(input_ids=PROMPTS, sampling_params=GREEDY)
        assert [o["output_ids"] for o in again] == expected
