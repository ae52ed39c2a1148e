"""A Megatron-core model's weights reach `rollout serve` the way a slime user's do.

A tiny Qwen3-shaped `GPTModel` (megatron-core, local layer spec: no TransformerEngine, built on
the CPU) is converted to HF names by slime's own code (`named_params_and_buffers`,
`all_gather_param`, `convert_to_hf` for qwen3) and broadcast over gloo with slime's
distributed-update helpers to a `rollout serve` subprocess. The engine's greedy output must then
equal Hugging Face transformers' on the converted weights.

Megatron's forward does not run on a CPU (its rotary embedding calls torch.cuda.current_device()),
so transformers is the reference; weights only are built and moved here.
"""

from __future__ import annotations

from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
import torch.distributed as dist

from rollout_accel.serving.models import materialize_preset
from rollout_accel.serving.server import free_port
from tests.serving.serve_cli import rollout_serve
from tests.serving.slime_harness import InlineActor, inline_ray, slime_modules

__all__ = ["slime_modules"]

megatron_core = pytest.importorskip("megatron.core", reason="megatron-core is not installed")
transformers = pytest.importorskip("transformers")

# tiny-qwen3's shape (serving/models/presets.py): the engine serves the preset, the trainer
# pushes every weight of it.
SHAPE = dict(
    vocab_size=512,
    hidden_size=128,
    ffn_hidden_size=352,
    num_layers=4,
    num_attention_heads=4,
    num_query_groups=2,
    kv_channels=32,
)
# Local-spec parameter names differ from the TransformerEngine spec slime trains with only where
# TE fuses the norm into the next linear layer; slime's converters expect the TE names.
LOCAL_TO_TE = {
    ".input_layernorm.weight": ".self_attention.linear_qkv.layer_norm_weight",
    ".pre_mlp_layernorm.weight": ".mlp.linear_fc1.layer_norm_weight",
}


class DDPStandIn(torch.nn.Module):
    """What slime's named parameters see through DDP: the model under `.module`."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.module = model
        self.config = model.config


@pytest.fixture()
def megatron_world():
    """A one-rank default group + Megatron's model-parallel state (TP = PP = EP = 1)."""
    from megatron.core import parallel_state

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    parallel_state.initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def build_gpt_model() -> torch.nn.Module:
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=SHAPE["num_layers"],
        hidden_size=SHAPE["hidden_size"],
        ffn_hidden_size=SHAPE["ffn_hidden_size"],
        num_attention_heads=SHAPE["num_attention_heads"],
        num_query_groups=SHAPE["num_query_groups"],
        kv_channels=SHAPE["kv_channels"],
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=True,
        use_cpu_initialization=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm"),
        vocab_size=SHAPE["vocab_size"],
        max_sequence_length=4096,
        position_embedding_type="rope",
        rotary_base=1_000_000,
        share_embeddings_and_output_weights=True,  # tiny-qwen3 ties them, as Qwen3-4B does
    )
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Distinct, non-trivial values everywhere (Megatron starts norms at 1), so a
            # mis-split qkv or a swapped gate/up shows up in the outputs.
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if "layernorm" in name else 0.1 * noise)
            # What Megatron's get_model does for every parameter before training.
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
    return model


def converted_hf_weights(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """slime's Megatron -> HF path for one rank (TP = 1): global names, gather, convert."""
    from slime.backends.megatron_utils.megatron_to_hf import convert_to_hf
    from slime.backends.megatron_utils.update_weight.common import (
        all_gather_param,
        named_params_and_buffers,
    )

    args = Namespace(
        vocab_size=SHAPE["vocab_size"],
        hidden_size=SHAPE["hidden_size"],
        num_attention_heads=SHAPE["num_attention_heads"],
        num_query_groups=SHAPE["num_query_groups"],
        kv_channels=SHAPE["kv_channels"],
        num_experts=None,
        q_lora_rank=None,
    )
    out: list[tuple[str, torch.Tensor]] = []
    for name, param in named_params_and_buffers(args, [DDPStandIn(model)]):
        gathered = all_gather_param(name, param)
        for local, te in LOCAL_TO_TE.items():
            name = name.replace(local, te)
        out += convert_to_hf(args, "qwen3", name, gathered, None)
    return [(n, t.detach().contiguous()) for n, t in out]


def greedy(url: str, prompts: list[list[int]]) -> list[dict]:
    params = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    return [
        requests.post(
            f"{url}/generate", json={"input_ids": p, "sampling_params": params}, timeout=120
        ).json()
        for p in prompts
    ]


def test_megatron_gpt_weights_to_rollout_serve(
    slime_modules, megatron_world, tmp_path, monkeypatch
) -> None:
    from slime.backends.megatron_utils.update_weight import update_weight_from_distributed as uwd
    from slime.backends.sglang_utils.external import (
        apply_external_engine_info_to_args,
        external_engine_infos_from_args,
        external_engine_init_kwargs,
    )
    from slime.backends.sglang_utils.sglang_engine import SGLangEngine

    named = converted_hf_weights(build_gpt_model())
    names = {n for n, _ in named}
    assert "model.layers.3.self_attn.q_norm.weight" in names
    assert "model.layers.0.mlp.gate_proj.weight" in names and "lm_head.weight" not in names

    # The reference: transformers' Qwen3 on the converted weights.
    hf_dir = materialize_preset("tiny-qwen3", tmp_path / "hf")
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    missing, unexpected = reference.load_state_dict(dict(named), strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}  # tied to embed_tokens
    reference.tie_weights()
    prompts = [[5, 17, 99, 3], [42, 42, 7]]
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            ids = reference.generate(
                torch.tensor([prompt]),
                max_new_tokens=12,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            expected.append(ids[0, len(prompt) :].tolist())

    monkeypatch.setattr(uwd, "ray", inline_ray())
    with rollout_serve(["--model-path", "tiny-qwen3"], tmp_path / "serve.log") as url:
        args = Namespace(
            rollout_external_engine_addrs=[url.removeprefix("http://")],
            rollout_external=True,
            hf_checkpoint=str(hf_dir),
            seed=0,
            num_gpus_per_node=1,
            rollout_num_gpus_per_engine=1,
            offload_rollout=False,
            sglang_pp_size=1,
            sglang_dp_size=1,
            sglang_ep_size=1,
            use_rollout_routing_replay=False,
            fp16=False,
            sglang_router_ip=None,
            sglang_router_port=None,
        )
        apply_external_engine_info_to_args(args)
        (info,) = external_engine_infos_from_args(args)
        engine = SGLangEngine(args, rank=0, base_gpu_id=0, num_gpus_per_engine=info.num_gpus)
        engine.init(**external_engine_init_kwargs(info))
        assert [o["output_ids"] for o in greedy(url, prompts)] != expected  # preset weights
        with ThreadPoolExecutor(max_workers=2) as pool:
            actors = [InlineActor(engine, pool)]
            group = uwd.connect_rollout_engines_from_distributed(
                args, "slime-pp_0", actors, engine_gpu_counts=[info.num_gpus]
            )
            engine.pause_generation()
            engine.flush_cache()
            replies = inline_ray().get(
                uwd.update_weights_from_distributed("slime-pp_0", group, 1, actors, named)
            )
            assert all(r["success"] for r in replies), replies
            engine.continue_generation()
            uwd.disconnect_rollout_engines_from_distributed(args, "slime-pp_0", group, actors)

        outs = greedy(url, prompts)
    assert all(o["meta_info"]["weight_version"] == "1" for o in outs)
    assert [o["output_ids"] for o in outs] == expected
