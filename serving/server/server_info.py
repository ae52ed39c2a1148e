"""`/server_info`: SGLang's server-args dict, filled truthfully from our engine.

SGLang answers `/server_info` with `dataclasses.asdict(server_args)` plus scheduler facts. slime,
given `--rollout-external-engine-addrs`, reads the topology from it (`tp_size`, `pp_size`,
`ep_size`, `moe_dp_size`, `num_gpus`, `disaggregation_mode`, `disaggregation_bootstrap_port`,
`encoder_only`) and asserts that every field in its `external_engine_need_check_fields`
(`enable_memory_saver` always; `dtype` with `--fp16`; `enable_return_routed_experts` with routing
replay; the disaggregation fields for PD workers) equals the server args it would have launched
SGLang with. So every key here is SGLang's name with the value that holds for this server.

Invariant: a field describes what the server does — one engine, one device, no parallelism, no
disaggregation; a feature we lack is reported off, never on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rollout_accel.serving.server.server_args import ServerArgs

if TYPE_CHECKING:
    from rollout_accel.serving.engine import Engine

SERVER_VERSION = "rollout-accel-0.1.0"


def _fixed_topology(num_gpus: int) -> dict[str, Any]:
    """The parallel layout of one engine of ours: a single rank, nothing split or disaggregated."""
    return {
        "tp_size": 1,
        "pp_size": 1,
        "dp_size": 1,
        "ep_size": 1,
        "moe_dp_size": 1,
        "nnodes": 1,
        "node_rank": 0,
        "num_gpus": num_gpus,
        "base_gpu_id": 0,
        "gpu_id_step": 1,
        "dist_init_addr": None,
        "nccl_port": None,
        "enable_dp_attention": False,
        "disaggregation_mode": "null",  # SGLang's value for "not disaggregated"
        "disaggregation_bootstrap_port": None,
        "disaggregation_transfer_backend": None,
        "load_balance_method": "round_robin",
        "encoder_only": False,
        "enable_return_routed_experts": False,
        "enable_draft_weights_cpu_backup": False,
        "enable_lora": False,
        "enable_metrics": False,
        "skip_server_warmup": True,  # we run no warm-up request at start
        "trust_remote_code": False,  # model code is ours, never the checkpoint's
        "is_embedding": False,
    }


def build_server_info(
    engine: Engine, args: ServerArgs | None = None, loads: dict[str, Any] | None = None
) -> dict[str, Any]:
    """SGLang's `/server_info` body for `engine` served with `args`.

    `loads` (the engine's `get_loads()`) fills the scheduler facts and `internal_states`; it is
    passed in so the HTTP route can fetch it off the event loop.
    """
    args = args or ServerArgs()
    config = engine.config
    loads = dict(loads if loads is not None else engine.get_loads())
    device = engine.device
    model_config = engine.model_config
    speculative = getattr(config, "speculative_algorithm", None)
    info: dict[str, Any] = {
        **config.to_dict(),
        **args.to_dict(),
        **_fixed_topology(1 if device.type == "cuda" else 0),
        "model_path": config.model_path,
        "tokenizer_path": args.tokenizer_path or config.model_path,
        "served_model_name": args.served_model_name or config.model_path,
        # SGLang echoes the *argument* (e.g. "auto"); the resolved one is `model_dtype`.
        "dtype": config.dtype,
        "model_dtype": str(engine.dtype).removeprefix("torch."),
        "device": device.type,
        "random_seed": config.seed,
        "context_length": engine.context_length,
        "max_req_input_len": engine.context_length - 1,
        "max_total_num_tokens": loads.get("max_total_num_tokens"),
        "chunked_prefill_size": config.max_prefill_tokens,
        "disable_radix_cache": not config.enable_prefix_caching,
        "disable_cuda_graph": not (config.cuda_graph and device.type == "cuda"),
        "disable_overlap_schedule": not (config.overlap_schedule and device.type == "cuda"),
        "page_size": 1,
        "speculative_algorithm": speculative,
        "vocab_size": model_config.vocab_size,
        "architecture": model_config.hf_architecture,
        "num_hidden_layers": model_config.num_hidden_layers,
        "weight_version": engine.get_weight_version(),
        "internal_states": [loads],
        "version": SERVER_VERSION,
    }
    pp_size = getattr(config, "pp_size", 1)
    if pp_size > 1:  # pipeline stages: one process (and GPU) each; eager, no graphs
        info["pp_size"] = pp_size
        info["num_gpus"] = pp_size if device.type == "cuda" else 0
        info["disable_cuda_graph"] = True
    return info
