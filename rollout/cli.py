"""The `rollout` command: `serve`, `generate` (a demo), `bench`, `train`.

Each subcommand parses its own flags and imports its heavy modules lazily, so `rollout --help`
is instant and a bad flag is reported in one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--model-path",
        default="tiny-qwen3",
        help="HF-layout directory or preset name (tiny-qwen3, qwen3-0.6b-shape, ...)",
    )
    group.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    group.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    group.add_argument(
        "--max-running-requests", type=int, default=256, help="concurrent sequences in a batch"
    )
    group.add_argument(
        "--max-total-tokens", type=int, default=None, help="KV cache slots (default: derived)"
    )
    group.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=4096,
        help="token budget of one prefill step (chunked prefill)",
    )
    group.add_argument(
        "--schedule-policy",
        default="fcfs",
        choices=["fcfs", "lpm", "hrrn", "slo"],
        help="waiting-queue order (SGLang's flag; slo: cheapest prefill first, deadlines promoted)",
    )
    group.add_argument(
        "--ttft-slo-ms",
        type=float,
        default=5000.0,
        help="slo policy: TTFT deadline of requests without their own ttft_slo_ms (default 5000)",
    )
    group.add_argument(
        "--schedule-window",
        type=int,
        default=32,
        help="slo policy: oldest waiting requests scored per step (default 32)",
    )
    group.add_argument("--disable-radix-cache", action="store_true", help="turn prefix caching off")
    group.add_argument(
        "--disable-cuda-graph", action="store_true", help="run decode eagerly on GPUs"
    )
    group.add_argument(
        "--seed", type=int, default=0, help="preset weight seed and sampling seed base"
    )


def engine_kwargs(args: argparse.Namespace) -> dict:
    return {
        "model_path": args.model_path,
        "device": args.device,
        "dtype": args.dtype,
        "max_running_requests": args.max_running_requests,
        "max_total_tokens": args.max_total_tokens,
        "max_prefill_tokens": args.max_prefill_tokens,
        "schedule_policy": args.schedule_policy,
        "ttft_slo_ms": args.ttft_slo_ms,
        "schedule_window": args.schedule_window,
        "enable_prefix_caching": not args.disable_radix_cache,
        "cuda_graph": not args.disable_cuda_graph,
        "seed": args.seed,
    }


def _serve(args: argparse.Namespace) -> int:
    from rollout_accel.serving.engine import Engine
    from rollout_accel.serving.server import serve
    from rollout_accel.serving.server.server_args import parse_server_args
    from rollout_accel.serving.server.settings import ServerSettings

    settings = ServerSettings.from_args(args)
    kwargs, server_args = parse_server_args(args, engine_kwargs(args))
    engine = Engine(**kwargs)
    print(f"rollout-accel serving {args.model_path} on http://{args.host}:{args.port}", flush=True)
    serve(
        engine,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        log_level=args.log_level,
        settings=settings,
        server_args=server_args,
    )
    return 0


def _generate(args: argparse.Namespace) -> int:
    from rollout_accel.serving.engine import Engine

    with Engine(**engine_kwargs(args)) as engine:
        outs = engine.generate(
            prompt=args.prompt,
            sampling_params={
                "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature,
                "n": args.n,
            },
        )
        for out in outs if isinstance(outs, list) else [outs]:
            print(
                json.dumps(
                    {
                        "text": out["text"],
                        **{
                            k: out["meta_info"][k]
                            for k in ("finish_reason", "completion_tokens", "e2e_latency")
                        },
                    }
                )
            )
    return 0


def _lazy(module: str, func: str = "main") -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        import importlib

        return importlib.import_module(module).__dict__[func](argv) or 0

    return run


# Subcommands whose parsers live in their own modules (their --help is their own).
DELEGATED = {
    "bench": (
        "rollout_accel.rollout.bench.cli",
        "Compare rollout policies side by side (default: the synthetic long-tail scenario).",
    ),
    "train": (
        "rollout_accel.rollout.train_cli",
        "Run a local GRPO training recipe (recipes/local/*.toml).",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rollout", description="rollout-accel: fast RL rollouts for slime."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve", help="run the SGLang-protocol HTTP server on the embedded engine"
    )
    _add_engine_args(serve)
    # SGLang's server-arg names (--host, --port, --api-key, --mem-fraction-static, --tp-size, ...),
    # kept in the server package so the flags and their checks live next to /server_info; then
    # the serving limits and trust settings.
    from rollout_accel.serving.server.server_args import add_server_args
    from rollout_accel.serving.server.settings import add_server_args as add_server_settings

    add_server_settings(serve)

    add_server_args(serve)
    serve.set_defaults(handler=_serve)
    gen = sub.add_parser("generate", help="generate from a prompt on the embedded engine (a demo)")
    _add_engine_args(gen)
    gen.add_argument("--prompt", default="The rollout is", help="text prompt")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("-n", type=int, default=4, help="samples per prompt")
    gen.set_defaults(handler=_generate)
    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        module = DELEGATED[argv[0]][0]
        try:
            return _lazy(module)(argv[1:])
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("rollout_accel"):
                print(
                    f"rollout {argv[0]}: not available in this build ({exc.name})", file=sys.stderr
                )
                return 2
            raise
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as exc:  # bad engine arguments, unknown presets
        print(f"rollout {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
