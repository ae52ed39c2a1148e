"""SGLang's top_logprobs_num / token_ids_logprob / logprob_start_len: shapes as SGLang's
tokenizer manager assembles them (io_struct.py, tokenizer_manager.add_logprob_to_meta_info,
logprob_result_processor: per position [logprob, token_id, text|None]; the first prompt entry is
None), values against a dense forward (log_softmax + topk), on the engine and over HTTP."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from rollout_accel.serving.engine import Engine, InvalidRequestError
from rollout_accel.serving.server import ServerThread

PROMPT = [11, 42, 300, 7, 99, 260, 5, 17]
IDS = [1, 300, 511]
TOL = 1e-4


def _dense_logprobs(engine: Engine, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / T) at every position of `ids` from one dense (non-paged) forward."""
    with torch.inference_mode():
        logits = engine.model(torch.tensor([ids], device=engine.device))[0].float()
    return torch.log_softmax(logits / temperature, dim=-1).cpu()


def _check_row(row: list, ref: torch.Tensor, k: int) -> None:
    """One position's top-k against the reference distribution `ref` [V]."""
    vals, ids = torch.topk(ref, k)
    assert len(row) == k
    got_vals = [lp for lp, _, _ in row]
    assert max(abs(a - b) for a, b in zip(got_vals, vals.tolist(), strict=True)) < TOL
    assert got_vals == sorted(got_vals, reverse=True)
    # Ties aside, the same ids in the same order; each id's value is its reference logprob.
    for lp, tid, text in row:
        assert abs(ref[tid].item() - lp) < TOL and text is None
    assert {tid for _, tid, _ in row} == set(ids.tolist()) or abs(vals[-1] - vals[-2]) < TOL


def test_greedy_top_k_and_token_ids_match_a_dense_forward(engine: Engine) -> None:
    k = 5
    out = engine.generate(
        input_ids=PROMPT,
        sampling_params={"temperature": 0, "max_new_tokens": 6, "ignore_eos": True},
        return_logprob=True,
        logprob_start_len=0,
        top_logprobs_num=k,
        token_ids_logprob=IDS,
    )
    meta = out["meta_info"]
    ref = _dense_logprobs(engine, PROMPT + out["output_ids"])
    n_out, n_in = len(out["output_ids"]), len(PROMPT)
    assert len(meta["output_top_logprobs"]) == n_out == len(meta["output_token_ids_logprobs"])
    for i, row in enumerate(meta["output_top_logprobs"]):
        _check_row(row, ref[n_in - 1 + i], k)
        # Greedy: the top entry is the sampled token, with output_token_logprobs' value.
        chosen_lp, chosen_id, _ = meta["output_token_logprobs"][i]
        assert row[0][1] == chosen_id == out["output_ids"][i]
        assert abs(row[0][0] - chosen_lp) < TOL
        ids_row = meta["output_token_ids_logprobs"][i]
        assert [tid for _, tid, _ in ids_row] == IDS
        for lp, tid, _ in ids_row:
            assert abs(lp - ref[n_in - 1 + i, tid].item()) < TOL
    # Prompt side: one entry per prompt token, the first None (nothing predicted it).
    assert len(meta["input_top_logprobs"]) == n_in == len(meta["input_token_ids_logprobs"])
    assert meta["input_top_logprobs"][0] is None and meta["input_token_ids_logprobs"][0] is None
    for p in range(1, n_in):
        _check_row(meta["input_top_logprobs"][p], ref[p - 1], k)
        for lp, tid, _ in meta["input_token_ids_logprobs"][p]:
            assert abs(lp - ref[p - 1, tid].item()) < TOL


def test_sampled_rows_use_the_temperature_scaled_distribution(engine: Engine) -> None:
    params = {"temperature": 0.7, "max_new_tokens": 5, "ignore_eos": True, "sampling_seed": 3}
    out = engine.generate(
        input_ids=PROMPT, sampling_params=params, return_logprob=True, top_logprobs_num=4
    )
    ref = _dense_logprobs(engine, PROMPT + out["output_ids"], temperature=0.7)
    meta = out["meta_info"]
    for i, row in enumerate(meta["output_top_logprobs"]):
        _check_row(row, ref[len(PROMPT) - 1 + i], 4)
        # The sampled token's logprob comes from the same distribution.
        lp, tid, _ = meta["output_token_logprobs"][i]
        assert abs(ref[len(PROMPT) - 1 + i, tid].item() - lp) < TOL


def test_logprob_start_len_and_defaults_follow_sglang(engine: Engine) -> None:
    greedy = {"temperature": 0, "max_new_tokens": 3, "ignore_eos": True}
    # Default start (-1): output only; the prompt-side lists are empty.
    meta = engine.generate(
        input_ids=PROMPT,
        sampling_params=greedy,
        return_logprob=True,
        top_logprobs_num=2,
        token_ids_logprob=IDS,
    )["meta_info"]
    assert meta["input_token_logprobs"] == [] and meta["input_top_logprobs"] == []
    assert meta["input_token_ids_logprobs"] == []
    assert len(meta["output_top_logprobs"]) == 3
    # logprob_start_len = 3: prompt positions 3.., and the first of them is None.
    out = engine.generate(
        input_ids=PROMPT,
        sampling_params=greedy,
        return_logprob=True,
        logprob_start_len=3,
        top_logprobs_num=2,
        return_text_in_logprobs=True,
    )
    meta = out["meta_info"]
    assert [tid for _, tid, _ in meta["input_token_logprobs"]] == PROMPT[3:]
    assert meta["input_token_logprobs"][0][0] is None and meta["input_top_logprobs"][0] is None
    ref = _dense_logprobs(engine, PROMPT)
    for j, row in enumerate(meta["input_top_logprobs"][1:], start=4):
        assert abs(row[0][0] - ref[j - 1].max().item()) < TOL
        assert all(text == engine.tokenizer.token_text(tid) for _, tid, text in row)
    assert "input_token_ids_logprobs" not in meta  # only with token_ids_logprob
    # Without return_logprob nothing extra is returned (SGLang's guard).
    meta = engine.generate(input_ids=PROMPT, sampling_params=greedy, top_logprobs_num=3)[
        "meta_info"
    ]
    assert "output_top_logprobs" not in meta and "output_token_logprobs" not in meta


def test_per_prompt_options_in_one_batch(engine: Engine) -> None:
    """Rows that ask and rows that do not share a step; each gets exactly what it asked."""
    prompts = [PROMPT, PROMPT[:5], [3, 4, 5, 6]]
    outs = engine.generate(
        input_ids=prompts,
        sampling_params={"temperature": 0, "max_new_tokens": 4, "ignore_eos": True},
        return_logprob=True,
        top_logprobs_num=[0, 3, 1],
        token_ids_logprob=[[5], None, [7, 8]],
    )
    assert "output_top_logprobs" not in outs[0]["meta_info"]
    assert [len(r) for r in outs[1]["meta_info"]["output_top_logprobs"]] == [3] * 4
    assert "output_token_ids_logprobs" not in outs[1]["meta_info"]
    assert [len(r) for r in outs[2]["meta_info"]["output_top_logprobs"]] == [1] * 4
    assert [[t for _, t, _ in r] for r in outs[2]["meta_info"]["output_token_ids_logprobs"]] == [
        [7, 8]
    ] * 4
    for prompt, out in zip(prompts[1:], outs[1:], strict=True):
        ref = _dense_logprobs(engine, prompt + out["output_ids"])
        for i, row in enumerate(out["meta_info"]["output_top_logprobs"]):
            assert abs(row[0][0] - ref[len(prompt) - 1 + i].max().item()) < TOL


def test_cached_prefix_still_yields_every_prompt_logprob(engine: Engine) -> None:
    """A prompt already in the prefix cache is recomputed from logprob_start_len (SGLang's rule),
    so its prompt logprobs are complete and equal the uncached ones."""
    prompt = [200 + i for i in range(24)]
    greedy = {"temperature": 0, "max_new_tokens": 1}
    engine.generate(input_ids=prompt, sampling_params=greedy)  # warm the cache
    args = dict(return_logprob=True, logprob_start_len=0, top_logprobs_num=2)
    first = engine.generate(input_ids=prompt, sampling_params=greedy, **args)["meta_info"]
    again = engine.generate(input_ids=prompt, sampling_params=greedy, **args)["meta_info"]
    ref = _dense_logprobs(engine, prompt)
    for meta in (first, again):
        got = meta["input_token_logprobs"]
        assert len(got) == len(prompt) and got[0][0] is None
        for p in range(1, len(prompt)):
            assert abs(got[p][0] - ref[p - 1, prompt[p]].item()) < TOL
            assert abs(meta["input_top_logprobs"][p][0][0] - ref[p - 1].max().item()) < TOL
    # A later start lets the cache serve the positions before it.
    meta = engine.generate(
        input_ids=prompt, sampling_params=greedy, return_logprob=True, logprob_start_len=20
    )["meta_info"]
    assert meta["cached_tokens"] >= 20 and len(meta["input_token_logprobs"]) == 4


def test_retracted_requests_keep_aligned_top_logprobs() -> None:
    """Under KV pressure requests are retracted and recomputed; their positions stay aligned."""
    with Engine("tiny-qwen3", max_total_tokens=160, max_running_requests=8) as eng:
        prompts = [[(17 * i + j) % 500 for j in range(10)] for i in range(8)]
        outs = eng.generate(
            input_ids=prompts,
            sampling_params={"temperature": 0, "max_new_tokens": 24, "ignore_eos": True},
            return_logprob=True,
            logprob_start_len=0,
            top_logprobs_num=2,
        )
        assert eng.scheduler.stats.retractions > 0
        for prompt, out in zip(prompts, outs, strict=True):
            meta = out["meta_info"]
            tops = meta["output_top_logprobs"]
            assert len(tops) == len(out["output_ids"]) == 24
            assert [row[0][1] for row in tops] == out["output_ids"]
            assert len(meta["input_top_logprobs"]) == len(prompt)
            assert all(row is not None for row in meta["input_top_logprobs"][1:])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"top_logprobs_num": -1}, "top_logprobs_num"),
        ({"top_logprobs_num": "3"}, "top_logprobs_num"),
        ({"top_logprobs_num": 10**6}, "top_logprobs_num"),
        ({"token_ids_logprob": [1, 10**6]}, "token_ids_logprob"),
        ({"token_ids_logprob": "1"}, "token_ids_logprob"),
        ({"top_logprobs_num": [1, 2, 3]}, "top_logprobs_num"),
        ({"logprob_start_len": 99}, "logprob_start_len"),
    ],
)
def test_bad_options_name_the_field(engine: Engine, kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError, match=field):
        engine.generate(input_ids=PROMPT, return_logprob=True, **kwargs)


@pytest.fixture(scope="module")
def server():
    with ServerThread(model_path="tiny-qwen3", max_running_requests=32) as srv:
        yield srv


def test_bench_serving_style_requests(server) -> None:
    """SGLang's bench_serving payload (backend sglang, --top-logprobs-num 3), streamed and not,
    with and without --return-logprob."""
    for return_logprob in (False, True):
        payload = {
            "text": "hello world",
            "sampling_params": {"temperature": 0.0, "max_new_tokens": 6, "ignore_eos": True},
            "stream": True,
            "lora_path": None,
            "return_logprob": return_logprob,
            "return_routed_experts": False,
            "logprob_start_len": -1,
            "top_logprobs_num": 3,
        }
        chunks = []
        with httpx.stream("POST", f"{server.url}/generate", json=payload, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
        assert chunks and "error" not in chunks[-1]
        final = chunks[-1]["meta_info"]
        assert final["completion_tokens"] == 6
        if return_logprob:
            # Cumulative chunks: each carries one row per output token so far.
            for chunk in chunks:
                meta = chunk["meta_info"]
                assert len(meta["output_top_logprobs"]) == meta["completion_tokens"]
            assert all(len(row) == 3 for row in final["output_top_logprobs"])
            assert final["input_top_logprobs"] == []
        else:
            assert "output_top_logprobs" not in final
        r = httpx.post(f"{server.url}/generate", json={**payload, "stream": False}, timeout=60)
        assert r.status_code == 200 and r.json()["output_ids"] == chunks[-1]["output_ids"]


def test_http_shapes_and_refusals(server) -> None:
    r = httpx.post(
        f"{server.url}/generate",
        json={
            "input_ids": [[5, 6, 7], [8, 9]],
            "sampling_params": {"temperature": 0, "max_new_tokens": 2},
            "return_logprob": True,
            "logprob_start_len": 0,
            "top_logprobs_num": 2,
            "token_ids_logprob": [3, 4],
            "return_text_in_logprobs": True,
        },
        timeout=60,
    )
    assert r.status_code == 200
    for out, prompt in zip(r.json(), ([5, 6, 7], [8, 9]), strict=True):
        meta = out["meta_info"]
        assert meta["input_top_logprobs"][0] is None and len(meta["input_top_logprobs"]) == len(
            prompt
        )
        for key in ("output_top_logprobs", "output_token_ids_logprobs"):
            for row in meta[key]:
                assert all(
                    isinstance(lp, float) and isinstance(tid, int) and isinstance(text, str)
                    for lp, tid, text in row
                )
        assert [[t for _, t, _ in row] for row in meta["output_token_ids_logprobs"]] == [[3, 4]] * 2
    for bad, field in (
        ({"top_logprobs_num": -2}, "top_logprobs_num"),
        ({"token_ids_logprob": [-1]}, "token_ids_logprob"),
    ):
        r = httpx.post(
            f"{server.url}/generate",
            json={"input_ids": [1, 2], "return_logprob": True, **bad},
            timeout=60,
        )
        assert r.status_code == 400 and field in r.json()["error"]["message"]
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
