"""The engine on a GPU (Triton kernels, CUDA graphs) against the CPU reference path.

Marked `gpu`: skipped without CUDA; run on a GPU by scripts/gpu_tests.sh.
"""

from __future__ import annotations

import pytest
import torch

from rollout_accel.serving.engine import Engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

NEW = 64


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    lens = [1, 5, 17, 40, 64, 128, 9, 33]
    return [torch.randint(0, 500, (n,), generator=gen).tolist() for n in lens]


@pytest.fixture(scope="module")
def cpu_reference() -> list[dict]:
    with Engine("tiny-qwen3", device="cpu", dtype="float32") as eng:
        return eng.generate(
            input_ids=_prompts(),
            sampling_params={"temperature": 0, "max_new_tokens": NEW, "ignore_eos": True},
            return_logprob=True,
        )


def test_fp32_gpu_greedy_matches_cpu_reference(cpu_reference) -> None:
    with Engine("tiny-qwen3", device="cuda", dtype="float32", max_prefill_tokens=64) as eng:
        outs = eng.generate(
            input_ids=_prompts(),
            sampling_params={"temperature": 0, "max_new_tokens": NEW, "ignore_eos": True},
            return_logprob=True,
        )
        assert getattr(eng.runner, "graph_steps", 0) > 0, "decode should replay CUDA graphs"
    for ref, out in zip(cpu_reference, outs, strict=True):
        assert out["output_ids"] == ref["output_ids"]
        diffs = [
            abs(a[0] - b[0])
            for a, b in zip(
                out["meta_info"]["output_token_logprobs"],
                ref["meta_info"]["output_token_logprobs"],
                strict=True,
            )
        ]
        assert max(diffs) < 1e-3


def test_bf16_logprobs_within_tolerance(cpu_reference) -> None:
    """Teacher-forced: the GPU bf16 engine scores the CPU's greedy continuation."""
    with Engine("tiny-qwen3", device="cuda", dtype="bfloat16") as eng:
        worst = 0.0
        for prompt, ref in zip(_prompts(), cpu_reference, strict=True):
            out = eng.generate(
                input_ids=prompt + ref["output_ids"],
                sampling_params={"temperature": 0, "max_new_tokens": 1},
                return_logprob=True,
                logprob_start_len=0,
            )
            got = out["meta_info"]["input_token_logprobs"][len(prompt) :]
            want = ref["meta_info"]["output_token_logprobs"]
            assert len(got) == len(want)
            worst = max(worst, max(abs(g[0] - w[0]) for g, w in zip(got, want, strict=True)))
    assert worst < 0.15, worst


def test_cuda_graph_equals_eager() -> None:
    params = {"temperature": 0.8, "max_new_tokens": 48, "ignore_eos": True, "sampling_seed": 5}
    results = []
    for graphs in (False, True):
        with Engine("tiny-qwen3", device="cuda", dtype="float32", cuda_graph=graphs) as eng:
            results.append(
                [
                    o["output_ids"]
                    for o in eng.generate(input_ids=_prompts(), sampling_params=params)
                ]
            )
    assert results[0] == results[1]


def test_gpu_preemption_and_prefix_cache_keep_outputs(cpu_reference) -> None:
    with Engine("tiny-qwen3", device="cuda", dtype="float32", max_total_tokens=700) as eng:
        outs = eng.generate(
            input_ids=_prompts(),
            sampling_params={"temperature": 0, "max_new_tokens": NEW, "ignore_eos": True},
        )
        assert eng.scheduler.stats.retractions > 0
    assert [o["output_ids"] for o in outs] == [r["output_ids"] for r in cpu_reference]


def test_overlap_schedule_matches_synchronous() -> None:
    """The overlapped decode loop (CPU one step ahead) gives the same tokens as the synchronous
    one, with requests finishing at different steps (lengths, stop tokens) and seeded sampling."""
    prompts = _prompts()
    params = [
        {
            "temperature": 0.9,
            "max_new_tokens": 8 + 9 * i,
            "sampling_seed": i,
            "stop_token_ids": [7, 300],
        }
        for i in range(len(prompts))
    ]
    results = []
    for overlap in (False, True):
        with Engine("tiny-qwen3", device="cuda", dtype="float32", overlap_schedule=overlap) as eng:
            outs = eng.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
            results.append([(o["output_ids"], o["meta_info"]["finish_reason"]) for o in outs])
            loads = eng.get_loads()
            assert loads["num_running_reqs"] == 0
            # Every slot computed ahead for a finished request came back.
            assert loads["num_used_tokens"] == loads["num_cached_tokens"]
    assert results[0] == results[1]
