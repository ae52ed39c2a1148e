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
        assert eng.runner.graphs is not None and eng.runner.graphs.replays > 0
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


def test_prefill_chunk_graphs_equal_eager_mixed_steps(cpu_reference) -> None:
    """Prefill-only and mixed steps as graph replays (the default) give the eager engine's
    tokens (fp32, greedy: the CPU reference; seeded temperature 1: graphs off), and they ran."""
    sampled = {"temperature": 1.0, "max_new_tokens": 32, "ignore_eos": True, "sampling_seed": 3}
    runs = []
    for cap in (0, None):
        with Engine(
            "tiny-qwen3",
            device="cuda",
            dtype="float32",
            max_prefill_tokens=48,
            prefill_cuda_graph_max_tokens=cap,
        ) as eng:
            greedy = eng.generate(
                input_ids=_prompts(),
                sampling_params={"temperature": 0, "max_new_tokens": NEW, "ignore_eos": True},
            )
            eng.flush_cache()
            outs = eng.generate(input_ids=_prompts(), sampling_params=sampled)
            runs.append([o["output_ids"] for o in outs])
            assert [o["output_ids"] for o in greedy] == [r["output_ids"] for r in cpu_reference]
            graphed = eng.runner.graphed_prefill_steps
            assert (graphed > 0) == (cap is None), graphed
    assert runs[0] == runs[1]


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


def _greedy(eng: Engine, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy outputs from an empty prefix cache: every run computes the same way (a cached
    prefix changes which tokens are prefilled, and bf16 rounds those paths differently)."""
    eng.flush_cache()
    params = {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True}
    return [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=params)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_release_resume_recaptures_graphs_and_keeps_outputs(dtype: str) -> None:
    """slime's colocated step: generate -> release(weights, kv_cache, cuda_graph) -> resume ->
    generate, with CUDA graphs on; graphs are captured anew and outputs are identical."""
    prompts = _prompts()
    with Engine("qwen3-0.6b-shape", device="cuda", dtype=dtype, cuda_graph_max_bs=16) as eng:
        before = _greedy(eng, prompts)
        # Weights alone first: nearly all their bytes must go back (the fused qkv / gate_up
        # tensors own most of them; a release that kept those freed only embeddings and norms).
        weight_bytes = sum(p.numel() * p.element_size() for p in eng.model.parameters())
        free_before = torch.cuda.mem_get_info()[0]
        assert eng.release_memory_occupation(["weights"])[0]
        assert torch.cuda.mem_get_info()[0] > free_before + 0.9 * weight_bytes
        assert eng.resume_memory_occupation(["weights"])[0]
        assert _greedy(eng, prompts) == before
        replays = eng.runner.graphs.replays
        captures = eng.runner.graphs.captures
        chunk = eng.runner.chunk_graphs
        assert chunk is not None and chunk.captured
        chunk_captures = chunk.captures
        free_before = torch.cuda.mem_get_info()[0]
        ok, message = eng.release_memory_occupation(["weights", "kv_cache", "cuda_graph"])
        assert ok, message
        assert not eng.runner.graphs.captured and not chunk.captured
        assert torch.cuda.mem_get_info()[0] > free_before + 2**30  # weights + KV went back
        ok, message = eng.resume_memory_occupation(["weights", "kv_cache", "cuda_graph"])
        assert ok, message
        assert eng.runner.graphs.captures == captures + 1
        assert chunk.captures == chunk_captures + 1
        after = _greedy(eng, prompts)
        assert eng.runner.graphs.replays > replays, "decode should replay the new graphs"
        # Twice more, as every RL step does.
        for _ in range(2):
            assert eng.release_memory_occupation()[0]
            assert eng.resume_memory_occupation()[0]
        again = _greedy(eng, prompts)
    assert after == before
    assert again == before


def test_release_resume_with_weight_update_between() -> None:
    from rollout_accel.serving.models.loader import load_model

    prompts = _prompts()
    other = load_model("tiny-qwen3", dtype="float32", seed=321).model
    named = [(n, t.cuda()) for n, t in other.state_dict().items()]
    with Engine("tiny-qwen3", device="cuda", dtype="float32") as eng:
        before = _greedy(eng, prompts)
        assert eng.release_memory_occupation()[0]
        assert eng.resume_memory_occupation(["weights"])[0]
        ok, message = eng.update_weights_from_tensor(named, weight_version="2")
        assert ok, message
        assert eng.resume_memory_occupation(["kv_cache", "cuda_graph"])[0]
        changed = _greedy(eng, prompts)
        assert eng.runner.graphs.replays > 0
    with Engine("tiny-qwen3", device="cuda", dtype="float32", seed=321) as fresh:
        expected = _greedy(fresh, prompts)
    assert changed == expected
    assert changed != before


def test_recapture_cuda_graph_flag_on_disk_update(tmp_path) -> None:
    from rollout_accel.serving.models.loader import materialize_preset

    path = materialize_preset("tiny-qwen3", tmp_path / "m", seed=77)
    prompts = _prompts()
    with Engine("tiny-qwen3", device="cuda", dtype="float32") as eng:
        captures = eng.runner.graphs.captures
        ok, message = eng.update_weights_from_disk(str(path), recapture_cuda_graph=True)
        assert ok, message
        assert eng.runner.graphs.captures == captures + 1
        got = _greedy(eng, prompts)
    with Engine("tiny-qwen3", device="cuda", dtype="float32", seed=77) as fresh:
        assert got == _greedy(fresh, prompts)


def test_engine_failure_on_gpu_is_isolated() -> None:
    """A step failing for one request (a Python error, not a CUDA fault) fails it alone."""
    from rollout_accel.serving.engine import InvalidRequestError

    prompts = _prompts()
    with Engine("tiny-qwen3", device="cuda", dtype="float32") as eng:
        clean = _greedy(eng, prompts)
        launch = eng.runner.launch

        def poisoned(batch):
            if any(it.request.rid == "poison" for it in batch.items):
                raise RuntimeError("injected")
            return launch(batch)

        eng.runner.launch = poisoned
        with pytest.raises(InvalidRequestError):
            eng.generate(input_ids=[1, 2], sampling_params={"max_new_tokens": 4}, rid="poison")
        assert _greedy(eng, prompts) == clean
        loads = eng.get_loads()
        assert loads["num_used_tokens"] == loads["num_cached_tokens"]
