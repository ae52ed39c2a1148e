"""GPU benchmark of cross-agent KV reuse (chunk store + CacheBlend selective recompute).

    python scripts/gpu_kvreuse_bench.py [--ratios 0,0.05,0.15,0.3,1] [--skip-toy]

Two parts, in one run on one card (about 3 minutes on an H200, most of it Triton compiles and the
toy policy's SFT when its cache is cold):
  * speed: qwen3-0.6b-shape, bf16 random weights, the multi-agent stream at GPU scale (4 agents x
    3 rounds; 4 shared documents of 1024 tokens, 256-token outputs, 64-token system prompt and
    instructions, 32-token questions; ~5k-token prompts, >= 60% of prompt tokens in reusable
    chunks): TTFT (prefill wall time, synced) of full prefill vs reuse at each r, radix cache on
    in both, over the prompts that reuse anything; prefill work; reuse ratio. Quality vs full
    prefill is printed too, but random weights make near-ties, so greedy agreement there is noise.
  * quality: the local loop's SFT-warm-started arithmetic policy (6 layers, float32), whose
    outputs mean something, on its own multi-agent stream: next-token KL, top-1 and greedy-32
    agreement against full prefill of the same prompt, the curve over r.
Targets (issue 13): TTFT >= 3x lower at r = 0.15 on qwen3-0.6b-shape, and on the toy policy mean
KL <= 0.01 nats and greedy-32 agreement >= 0.95. Prints a table last; writes JSON to
$OUT/gpu_kvreuse.json (OUT defaults to ./out).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from repo_path import expose_repo

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--ratios", default="0,0.05,0.15,0.3,1", help="recompute ratios for the speed part"
    )
    p.add_argument(
        "--toy-ratios", default="0,0.05,0.1,0.15,0.25,0.5,1", help="ratios for the toy curve"
    )
    p.add_argument("--toy-layers", type=int, default=6)
    p.add_argument("--check-layer", type=int, default=1)
    p.add_argument("--skip-toy", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--sft-cache", default=str(ROOT / "bench-out" / "kvreuse-sft-cache"))
    p.add_argument("--speed-model", default="qwen3-0.6b-shape", help="preset of the speed part")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only for a smoke run")
    args = p.parse_args(argv)
    expose_repo()
    import torch

    from rollout_accel.rollout.bench.kvreuse_scenario import (
        TOY_WORKLOAD,
        arithmetic_text,
        evaluate_model,
        table,
        toy_policy,
    )
    from rollout_accel.serving.kvreuse.workload import (
        MultiAgentConfig,
        multi_agent_stream,
        random_tokens,
    )
    from rollout_accel.serving.models import load_model

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_kvreuse_bench: needs a CUDA device")
        return 1
    if args.device == "cpu":
        torch.set_num_threads(1)
    gpu_workload = MultiAgentConfig(
        agents=4,
        rounds=3,
        documents=4,
        document_tokens=1024,
        system_tokens=64,
        instruction_tokens=64,
        output_tokens=256,
        question_tokens=32,
    )
    start = time.perf_counter()
    results = []
    if not args.skip_speed:
        dtype = "bfloat16" if args.device == "cuda" else "float32"
        model = load_model(args.speed_model, dtype=dtype, device=args.device).model
        model.fuse_projections()
        prompts = multi_agent_stream(gpu_workload, random_tokens(model.config.vocab_size))
        ratios = [float(r) for r in args.ratios.split(",")]
        with torch.inference_mode():
            res = evaluate_model(args.speed_model, model, prompts, ratios, args.check_layer, 32, 16)
        res["workload"] = asdict(gpu_workload)
        res["dtype"] = dtype
        results.append(res)
        print(f"speed part done at {time.perf_counter() - start:.0f} s", flush=True)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if not args.skip_toy:
        model, task = toy_policy(args.toy_layers, args.device, args.sft_cache)
        model.fuse_projections()
        prompts = multi_agent_stream(
            TOY_WORKLOAD, arithmetic_text(task), prefix=[task.tokenizer.bos_id]
        )
        ratios = [float(r) for r in args.toy_ratios.split(",")]
        with torch.inference_mode():
            res = evaluate_model(
                f"toy-l{args.toy_layers}", model, prompts, ratios, args.check_layer, 32, 16
            )
        res["workload"] = asdict(TOY_WORKLOAD)
        res["dtype"] = "float32"
        results.append(res)
    verdict = {}
    for res in results:
        point = next((c for c in res["curve"] if abs(c["ratio"] - 0.15) < 1e-9), None)
        if point is None:
            continue
        if res["model"] == args.speed_model:
            verdict["ttft_speedup_p50_at_0.15"] = point["speedup_p50"]
            verdict["ttft_target_met"] = point["speedup_p50"] >= 3.0
        else:
            q = point["quality"]
            verdict["toy_kl_mean_at_0.15"] = q.get("kl_mean")
            verdict["toy_greedy_agreement_at_0.15"] = q.get("greedy_agreement")
            verdict["quality_target_met"] = (
                q.get("kl_mean", 1.0) <= 0.01 and q.get("greedy_agreement", 0.0) >= 0.95
            )
    payload = {
        "schema": 1,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "seconds": time.perf_counter() - start,
        "results": results,
        "verdict": verdict,
    }
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_kvreuse.json").write_text(json.dumps(payload, indent=2))
    print(json.dumps(verdict))
    print(f"total {payload['seconds']:.0f} s on {payload['device']}")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
