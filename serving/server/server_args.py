"""`rollout serve` arguments under SGLang's server-arg names.

A script written for `python -m sglang.launch_server` (slime's recipes, SGLang's docs) runs against
`rollout serve` with the same flags. Three kinds of flag:
- engine arguments (`--model-path`, `--mem-fraction-static`, `--context-length`, ...) become
  `EngineConfig` fields;
- server arguments (`--host`, `--port`, `--api-key`, `--enable-memory-saver`, ...) become
  `ServerArgs`, which `/server_info` reports;
- SGLang features this engine does not have (tensor parallelism > 1, disaggregation,
  quantization, ...) are accepted only at the value that means "off"; anything else is refused
  with a message naming the flag, never silently dropped.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields
from typing import Any

from rollout_accel.serving.engine.config import EngineConfig


@dataclass(frozen=True, slots=True)
class ServerArgs:
    """Server-level arguments (SGLang's names) that are not engine arguments.

    enable_memory_saver: SGLang's switch for freeing GPU memory on `/release_memory_occupation`.
    Our engine always frees it; the flag is reported in `/server_info` because slime checks it
    against `--offload-rollout` — set it to what the slime run expects.
    """

    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    enable_memory_saver: bool = False
    served_model_name: str | None = None
    tokenizer_path: str | None = None
    log_level: str = "warning"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["api_key"] = None if self.api_key is None else "<set>"  # never echo the secret
        return out


class ServerArgsError(ValueError):
    """A flag asks for something this engine cannot do; the message names the flag."""


# SGLang flags we accept only at their "off" value: flag -> (dest, the accepted values).
_OFF_ONLY: dict[str, tuple[str, tuple[Any, ...]]] = {
    "--tp-size": ("tp_size", (1,)),
    "--dp-size": ("dp_size", (1,)),
    "--ep-size": ("ep_size", (1,)),
    "--nnodes": ("nnodes", (1,)),
    "--page-size": ("page_size", (1,)),
    "--disaggregation-mode": ("disaggregation_mode", ("null",)),
    "--quantization": ("quantization", (None,)),
    "--kv-cache-dtype": ("kv_cache_dtype", ("auto",)),
    "--load-format": ("load_format", ("auto", "safetensors")),
}
_OFF_ONLY_SWITCHES = {
    "--enable-dp-attention": "one engine of ours is one rank; there is no data-parallel attention",
    "--enable-lora": "LoRA adapters are not supported",
    "--enable-metrics": "there is no Prometheus /metrics endpoint",
    "--enable-return-routed-experts": "only dense models are served (no experts to route)",
}
_PARALLEL = ("tp_size", "dp_size", "pp_size", "ep_size", "nnodes")
SPECULATIVE_ALGORITHMS = ("NGRAM", "EAGLE", "EAGLE3", "STANDALONE")
SUPPORTED_SPECULATIVE = ("NGRAM",)  # serving/spec: n-gram drafts, exact verification


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """The SGLang-named flags `rollout serve` adds on top of the shared engine flags."""
    server = parser.add_argument_group("server (SGLang's names)")
    server.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    server.add_argument("--port", type=int, default=30000)
    server.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    server.add_argument("--log-level", default="warning")
    server.add_argument("--served-model-name", default=None, help="reported in /server_info")
    server.add_argument(
        "--tokenizer-path",
        default=None,
        help="reported in /server_info; the tokenizer is read from --model-path",
    )
    server.add_argument(
        "--enable-memory-saver",
        action="store_true",
        help="report memory saving on (release always frees memory here); match slime's "
        "--offload-rollout",
    )
    engine = parser.add_argument_group("engine (SGLang's names)")
    engine.add_argument("--mem-fraction-static", type=float, default=None)
    engine.add_argument("--context-length", type=int, default=None)
    engine.add_argument(
        "--chunked-prefill-size", type=int, default=None, help="alias of --max-prefill-tokens"
    )
    engine.add_argument("--random-seed", type=int, default=None, help="alias of --seed")
    engine.add_argument("--cuda-graph-max-bs", type=int, default=None)
    engine.add_argument(
        "--prefill-cuda-graph-max-tokens",
        type=int,
        default=None,
        help="prefill chunks up to this many tokens replay CUDA graphs, alone or after a mixed "
        "step's decode graph (default: --max-prefill-tokens, at most 4096; 0: off)",
    )
    engine.add_argument("--disable-overlap-schedule", action="store_true")
    engine.add_argument(
        "--enable-sm-share",
        action="store_true",
        help="run mixed steps' decode and prefill concurrently on disjoint SM partitions "
        "(green contexts; Hopper+, CUDA driver >= 12.4; elsewhere off with a log line)",
    )
    engine.add_argument(
        "--sm-share-tpot-ms", type=float, default=None, help="step-time bound for SM sharing"
    )
    engine.add_argument("--weight-version", default=None, help="initial weight_version")
    engine.add_argument(
        "--pp-size",
        "--pipeline-parallel-size",
        dest="pp_size",
        type=int,
        default=1,
        help="pipeline stages, one process (and GPU) each (rollout_accel.serving.pipeline)",
    )
    engine.add_argument(
        "--pp-rebalance",
        action="store_true",
        help="ours, not SGLang's: move layers between stages from predicted stage latencies",
    )
    engine.add_argument(
        "--pp-cuda-graph",
        action="store_true",
        help="ours: replay each pipeline stage's decode micro-batches from CUDA graphs",
    )
    engine.add_argument(
        "--speculative-algorithm",
        default=None,
        type=str.upper,
        help=f"one of {', '.join(SPECULATIVE_ALGORITHMS)} where this engine build supports it",
    )
    engine.add_argument(
        "--speculative-num-draft-tokens",
        type=int,
        default=None,
        help="NGRAM: verify window, the last token plus up to this many - 1 drafts (default 6)",
    )
    engine.add_argument(
        "--speculative-ngram-external-corpus-max-tokens",
        type=int,
        default=None,
        help="NGRAM: token budget of all /add_external_corpus corpora (default 10M)",
    )
    # Accepted for compatibility; true here whatever is passed.
    engine.add_argument(
        "--trust-remote-code", action="store_true", help="no effect: no remote code"
    )
    engine.add_argument("--skip-server-warmup", action="store_true", help="no effect: no warm-up")
    off = parser.add_argument_group("SGLang features accepted only when off")
    aliases = {
        "--tp-size": "--tensor-parallel-size",
        "--dp-size": "--data-parallel-size",
        "--pp-size": "--pipeline-parallel-size",
        "--ep-size": "--expert-parallel-size",
    }
    for flag, (dest, allowed) in _OFF_ONLY.items():
        names = [flag, *([aliases[flag]] if flag in aliases else [])]
        kind = int if isinstance(allowed[0], int) else str
        off.add_argument(*names, dest=dest, type=kind, default=allowed[0])
    for flag in _OFF_ONLY_SWITCHES:
        off.add_argument(flag, action="store_true")


def parse_server_args(
    args: argparse.Namespace, engine_kwargs: dict[str, Any]
) -> tuple[dict[str, Any], ServerArgs]:
    """Validates the SGLang-named flags; returns (engine kwargs, server args).

    `engine_kwargs` holds the shared engine flags already parsed; SGLang-named flags given
    explicitly override them. Raises ServerArgsError naming the first flag we cannot honour.
    """
    for flag, (dest, allowed) in _OFF_ONLY.items():
        value = getattr(args, dest)
        if value not in allowed:
            hint = "; run one `rollout serve` per GPU instead" if dest in _PARALLEL else ""
            raise ServerArgsError(
                f"{flag}={value}: not supported by this engine "
                f"(accepted: {', '.join(map(str, allowed))}){hint}"
            )
    for flag, why in _OFF_ONLY_SWITCHES.items():
        if getattr(args, flag.removeprefix("--").replace("-", "_")):
            raise ServerArgsError(f"{flag}: not supported by this engine ({why})")
    if args.pp_size < 1:
        raise ServerArgsError(f"--pp-size={args.pp_size}: must be >= 1")
    kwargs = dict(engine_kwargs)
    if args.pp_size > 1:
        kwargs["pp_size"] = args.pp_size
        kwargs["pp_rebalance"] = bool(args.pp_rebalance)
        kwargs["pp_cuda_graph"] = bool(args.pp_cuda_graph)
    overrides = {
        "mem_fraction_static": args.mem_fraction_static,
        "context_length": args.context_length,
        "max_prefill_tokens": args.chunked_prefill_size,
        "seed": args.random_seed,
        "cuda_graph_max_bs": args.cuda_graph_max_bs,
        "prefill_cuda_graph_max_tokens": args.prefill_cuda_graph_max_tokens,
        "weight_version": args.weight_version,
    }
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    if args.disable_overlap_schedule:
        kwargs["overlap_schedule"] = False
    if args.enable_sm_share:
        kwargs["sm_share"] = True
    if args.sm_share_tpot_ms is not None:
        kwargs["sm_share_tpot_ms"] = args.sm_share_tpot_ms
    if args.speculative_algorithm is not None:
        known = {f.name for f in fields(EngineConfig)}
        if args.speculative_algorithm not in SPECULATIVE_ALGORITHMS:
            raise ServerArgsError(
                f"--speculative-algorithm={args.speculative_algorithm}: unknown; SGLang's are "
                f"{', '.join(SPECULATIVE_ALGORITHMS)}"
            )
        if "speculative_algorithm" not in known:
            raise ServerArgsError(
                f"--speculative-algorithm={args.speculative_algorithm}: speculative decoding is "
                "not in this engine build"
            )
        if args.speculative_algorithm not in SUPPORTED_SPECULATIVE:
            raise ServerArgsError(
                f"--speculative-algorithm={args.speculative_algorithm}: not supported by this "
                f"engine (supported: {', '.join(SUPPORTED_SPECULATIVE)})"
            )
        kwargs["speculative_algorithm"] = args.speculative_algorithm
    for flag in ("speculative_num_draft_tokens", "speculative_ngram_external_corpus_max_tokens"):
        if getattr(args, flag) is not None:
            kwargs[flag] = getattr(args, flag)
    server = ServerArgs(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        enable_memory_saver=args.enable_memory_saver,
        served_model_name=args.served_model_name,
        tokenizer_path=args.tokenizer_path,
        log_level=args.log_level,
    )
    return kwargs, server
