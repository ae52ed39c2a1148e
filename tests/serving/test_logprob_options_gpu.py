"""top_logprobs_num / token_ids_logprob on the GPU paths: CUDA-graph decode, overlapped steps
(sampling one token ahead) and eager prefill, against a dense forward of the same model.

Marked `gpu`: skipped without CUDA; run by scripts/gpu_tests.sh (no FastAPI imports here).
"""

from __future__ import annotations

import pytest
import torch

from rollout_accel.serving.engine import Engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

TOL = 2e-3  # float32 on the GPU (Triton attention) against the dense PyTorch path


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, 500, (n,), generator=gen).tolist() for n in (3, 9, 17, 33, 6, 12)]


def _dense(eng: Engine, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    with torch.inference_mode():
        logits = eng.model(torch.tensor([ids], device=eng.device))[0].float()
    return torch.log_softmax(logits / temperature, dim=-1).cpu()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_graph_and_overlap_paths_match_a_dense_forward(temperature: float) -> None:
    prompts = _prompts()
    with Engine("tiny-qwen3", device="cuda", dtype="float32") as eng:
        outs = eng.generate(
            input_ids=prompts,
            sampling_params={
                "temperature": temperature,
                "max_new_tokens": 40,
                "ignore_eos": True,
                "sampling_seed": 1,
            },
            return_logprob=True,
            logprob_start_len=0,
            # Every other prompt asks nothing extra: rows that ask share steps with rows that don't.
            top_logprobs_num=[4, 0, 4, 0, 2, 3],
            token_ids_logprob=[[1, 2], None, [7], None, None, [300]],
        )
        assert (
            eng.runner.graphs is not None and eng.runner.graphs.replays > 0
        )  # decode went through the captured graphs
        for prompt, out, k in zip(prompts, outs, [4, 0, 4, 0, 2, 3], strict=True):
            meta = out["meta_info"]
            if k == 0:
                assert "output_top_logprobs" not in meta
                continue
            ref = _dense(eng, prompt + out["output_ids"], temperature or 1.0)
            tops = meta["output_top_logprobs"]
            assert len(tops) == len(out["output_ids"]) == 40
            for i, row in enumerate(tops):
                want = torch.topk(ref[len(prompt) - 1 + i], k).values.tolist()
                assert max(abs(a - b) for a, b in zip([r[0] for r in row], want, strict=True)) < TOL
                lp, tid, _ = meta["output_token_logprobs"][i]
                assert abs(ref[len(prompt) - 1 + i, tid].item() - lp) < TOL
                if temperature == 0.0:
                    assert row[0][1] == tid  # aligned: the top entry is the sampled token
            raw = _dense(eng, prompt)  # prompt positions: the raw distribution
            for p in range(1, len(prompt)):
                want = raw[p - 1].max().item()
                assert abs(meta["input_top_logprobs"][p][0][0] - want) < TOL
            assert ("output_token_ids_logprobs" in meta) == (k != 2)  # prompt 4 asked no ids
            for i, row in enumerate(meta.get("output_token_ids_logprobs", [])):
                for value, tid, _ in row:
                    assert abs(ref[len(prompt) - 1 + i, tid].item() - value) < TOL


def test_streamed_chunks_grow_one_row_per_token() -> None:
    with Engine("tiny-qwen3", device="cuda", dtype="float32") as eng:
        chunks = list(
            eng.generate(
                input_ids=[5, 6, 7],
                sampling_params={"temperature": 0, "max_new_tokens": 24, "ignore_eos": True},
                return_logprob=True,
                top_logprobs_num=3,
                stream=True,
            )
        )
    for chunk in chunks:
        meta = chunk["meta_info"]
        assert len(meta["output_top_logprobs"]) == meta["completion_tokens"]
    final = chunks[-1]
    assert [row[0][1] for row in final["meta_info"]["output_top_logprobs"]] == final["output_ids"]
