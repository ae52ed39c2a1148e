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


def _graph_counts(runner) -> list[tuple[int, int, int]]:
    """(replays, captures, invalidations) per stage, as of the last step."""
    return [(s["replays"], s["captures"], s["invalidations"]) for s in runner.graph_stats]


def test_pp2_cuda_graphs_match_eager_and_pp1_across_moves_and_release() -> None:
    """pp_cuda_graph: float32 greedy tokens identical to pp = 1 (with its decode graphs) and to
    pp = 2 eager on the same engine; before and after forced layer moves (graphs dropped and
    captured again) and after release/resume; and the stages really replayed graphs."""
    args = dict(ARGS, dtype="float32")
    with Engine("tiny-qwen3", **args) as ref:
        expected = [
            o["output_ids"] for o in ref.generate(input_ids=PROMPTS, sampling_params=GREEDY)
        ]

    def generate(eng) -> list[list[int]]:
        return [o["output_ids"] for o in eng.generate(input_ids=PROMPTS, sampling_params=GREEDY)]

    # One micro-batch of 4 rows: bucket 4, pp = 1's GEMM shapes.
    with Engine("tiny-qwen3", pp_size=2, pp_microbatches=1, pp_cuda_graph=True, **args) as eng:
        runner = eng.runner
        assert runner.cuda_graphs
        stage0 = runner.executor.graphs
        assert stage0 is not None and stage0.captured  # every bucket captured at start
        assert stage0.buckets == [1, 2, 4, 8, 12, 16]
        eng.loop.call(lambda: runner.set_cuda_graphs(False))
        eager = generate(eng)
        eng.loop.call(lambda: runner.set_cuda_graphs(True))
        assert eager == expected
        before = _graph_counts(runner)
        assert generate(eng) == expected
        after = _graph_counts(runner)
        assert all(a[0] >= b[0] + 40 for a, b in zip(after, before, strict=True)), (before, after)
        # Forced layer moves with requests in flight: the graphs go, decode runs eagerly while
        # moves are queued, then both stages capture again for their new layer ranges.
        out: dict = {}
        thread = threading.Thread(target=lambda: out.update(r=generate(eng)))
        thread.start()
        for bounds, wait in (((0, 1, 4), 4), ((0, 3, 4), 12)):
            steps = runner.steps
            while runner.steps < steps + wait and thread.is_alive():
                thread.join(0.005)
            eng.loop.call(lambda b=bounds: runner.request_bounds(b))
        thread.join(120)
        assert out["r"] == expected
        moved = _graph_counts(runner)
        assert all(m[2] > a[2] for m, a in zip(moved, after, strict=True)), (after, moved)
        assert all(m[1] > a[1] for m, a in zip(moved, after, strict=True)), (after, moved)
        assert tuple(runner.bounds) == (0, 3, 4)
        assert generate(eng) == expected
        assert all(
            n[0] > m[0] for n, m in zip(_graph_counts(runner), moved, strict=True)
        )  # replays on the new ranges
        # Release / resume: graphs dropped with the memory, captured again afterwards.
        assert eng.release_memory_occupation()[0]
        assert eng.resume_memory_occupation()[0]
        released = _graph_counts(runner)
        assert generate(eng) == expected
        again = _graph_counts(runner)
        assert all(a[1] > r[1] and a[0] > r[0] for a, r in zip(again, released, strict=True))
        # Two micro-batches of 2 rows (bucket 2): graphs give the eager tokens.
        eng.loop.call(lambda: setattr(runner, "micro_batches", 2))
        eng.loop.call(lambda: runner.set_cuda_graphs(False))
        eager2 = generate(eng)
        eng.loop.call(lambda: runner.set_cuda_graphs(True))
        assert generate(eng) == eager2
