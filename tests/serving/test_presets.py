"""Preset models: built on meta and allocated once on the target device, with the same weights
(bit for bit) as constructing the model and drawing every parameter on the CPU; a preset that
draws on its device gives the same weights on the CPU too."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rollout_accel.serving.models import presets
from rollout_accel.serving.models.decoder import CausalLM
from rollout_accel.serving.models.loader import load_model
from rollout_accel.serving.models.presets import PRESETS, init_random_weights


def _reference(name: str, dtype: torch.dtype, seed: int) -> CausalLM:
    preset = PRESETS[name]
    model = CausalLM(preset.config)
    init_random_weights(model, preset.init_std, seed)
    return model.to(dtype=dtype)


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_preset_weights_match_the_cpu_drawn_reference(name: str, dtype: torch.dtype) -> None:
    got = load_model(name, dtype=dtype, seed=3).model
    want = _reference(name, dtype, seed=3)
    got_state, want_state = got.state_dict(), want.state_dict()
    assert got_state.keys() == want_state.keys()
    for key, value in want_state.items():
        assert got_state[key].dtype == value.dtype and torch.equal(got_state[key], value), key
    assert torch.equal(got.model.rotary.inv_freq, want.model.rotary.inv_freq)
    assert got.model.rotary.inv_freq.dtype == dtype
    tied = PRESETS[name].config.tie_word_embeddings
    assert (got.lm_head.weight is got.model.embed_tokens.weight) == tied


def test_init_on_device_preset_is_the_same_on_the_cpu(monkeypatch) -> None:
    on_device = dataclasses.replace(PRESETS["tiny-qwen3"], init_on_device=True)
    monkeypatch.setitem(presets.PRESETS, "tiny-on-device", on_device)
    got = load_model("tiny-on-device", seed=5).model.state_dict()
    want = load_model("tiny-qwen3", seed=5).model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items())
    other = load_model("tiny-qwen3", seed=6).model.state_dict()
    assert not torch.equal(other["model.embed_tokens.weight"], want["model.embed_tokens.weight"])
