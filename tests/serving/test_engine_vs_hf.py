"""Our engine against Hugging Face transformers on the same random weights."""

from __future__ import annotations

import pytest
import torch

from rollout_accel.serving.engine import Engine

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 24


def _hf_greedy(model, prompt: list[int]) -> tuple[list[int], list[float]]:
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logprobs = [
        torch.log_softmax(step[0].float(), dim=-1)[tok].item()
        for step, tok in zip(out.logits, tokens, strict=True)
    ]
    return tokens, logprobs


@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-qwen2", "tiny-llama"])
def test_greedy_matches_transformers(preset: str, preset_dirs) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        preset_dirs[preset], dtype=torch.float32
    ).eval()
    hf.generation_config.eos_token_id = None  # the engine side runs with ignore_eos
    gen = torch.Generator().manual_seed(7)
    lengths = [1, 3, 9, 17, 33, 64, 5, 12]
    prompts = [torch.randint(0, 500, (n,), generator=gen).tolist() for n in lengths]
    # Our engine: a small prefill budget forces chunked prefill and mixed batch compositions.
    with Engine(str(preset_dirs[preset]), max_prefill_tokens=48) as eng:
        outs = eng.generate(
            input_ids=prompts,
            sampling_params={"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True},
            return_logprob=True,
        )
    for prompt, out in zip(prompts, outs, strict=True):
        ref_tokens, ref_logprobs = _hf_greedy(hf, prompt)
        assert out["output_ids"] == ref_tokens
        ours = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
        assert max(abs(a - b) for a, b in zip(ours, ref_logprobs, strict=True)) < 1e-4
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": NEW_TOKENS}


def test_prompt_logprobs_match_transformers(preset_dirs) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        preset_dirs["tiny-qwen3"], dtype=torch.float32
    ).eval()
    prompt = list(range(10, 40))
    with Engine(str(preset_dirs["tiny-qwen3"]), max_prefill_tokens=16) as eng:
        out = eng.generate(
            input_ids=prompt,
            sampling_params={"temperature": 0, "max_new_tokens": 2},
            return_logprob=True,
            logprob_start_len=0,
        )
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
    got = out["meta_info"]["input_token_logprobs"]
    assert len(got) == len(prompt) and got[0][0] is None
    for pos in range(1, len(prompt)):
        assert abs(got[pos][0] - ref[pos - 1, prompt[pos]].item()) < 1e-4
