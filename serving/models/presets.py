"""Seeded random-weight models of real shapes, with a tokenizer built offline (no hub).

`tiny-*` presets run fast on 2 CPU cores (tests, CPU benchmarks); `qwen3-0.6b-shape` has
Qwen3-0.6B's exact shape for GPU benchmarks. Same name + seed -> bit-identical weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rollout_accel.serving.models.config import ModelConfig

_EOS = 256  # "<|endoftext|>" in the byte-level tokenizer


@dataclass(frozen=True, slots=True)
class Preset:
    """A shape and its random init. `init_on_device`: draw the weights with the target device's
    generator (seconds instead of minutes for multi-GB shapes); the weights are then the same for
    one device type + seed, not across CPU and GPU. Otherwise they are drawn on the CPU, so every
    device gets the same weights."""

    config: ModelConfig
    init_std: float = 0.02
    init_on_device: bool = False


def _tiny(arch: str, **overrides) -> Preset:
    base = dict(
        architecture=arch,
        vocab_size=512,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        max_position_embeddings=4096,
        tie_word_embeddings=arch == "qwen3",
        attention_bias=arch == "qwen2",
        eos_token_ids=(_EOS,),
        bos_token_id=None,
    )
    base.update(overrides)
    return Preset(ModelConfig(**base), init_std=0.1)


PRESETS: dict[str, Preset] = {
    "tiny-qwen3": _tiny("qwen3"),
    "tiny-qwen2": _tiny("qwen2"),
    "tiny-llama": _tiny("llama", rope_theta=10_000.0),
    # Pipeline benchmarks on the CPU: 8 layers and a 32k vocabulary, so the last stage's LM head
    # and sampler weigh several layers (as a real vocabulary does on GPUs).
    "tiny-qwen3-8l-32k": _tiny("qwen3", num_hidden_layers=8, vocab_size=32_768),
    "qwen3-0.6b-shape": Preset(
        ModelConfig(
            architecture="qwen3",
            vocab_size=151_936,
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            rms_norm_eps=1e-6,
            rope_theta=1_000_000.0,
            max_position_embeddings=40_960,
            tie_word_embeddings=True,
            eos_token_ids=(_EOS,),
            torch_dtype="bfloat16",
        )
    ),
    # Qwen3-8B's exact shape (random bf16 weights) for pipeline-parallel GPU benchmarks.
    "qwen3-8b-shape": Preset(
        ModelConfig(
            architecture="qwen3",
            vocab_size=151_936,
            hidden_size=4096,
            intermediate_size=12_288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            rms_norm_eps=1e-6,
            rope_theta=1_000_000.0,
            max_position_embeddings=40_960,
            tie_word_embeddings=False,
            eos_token_ids=(_EOS,),
            torch_dtype="bfloat16",
        ),
        init_on_device=True,  # 8.2B parameters: drawn on the GPU, not the host
    ),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


@torch.no_grad()
def init_random_weights(
    model: torch.nn.Module, std: float, seed: int, device: str | torch.device = "cpu"
) -> None:
    """Normal(0, std) matrices and embeddings, ones for norms, small normal biases, drawn in
    float32 by a generator on `device` (the CPU by default, so every device gets the same
    weights) and cast to each parameter's dtype."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=gen.device)

    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.copy_(randn(param.shape) * std * 0.1)
        else:
            param.copy_((randn(param.shape) * std).to(param.dtype))
