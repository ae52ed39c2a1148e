"""The GPU engine benchmark, in one go: our engine vs transformers on qwen3-0.6b-shape.

    python scripts/gpu_bench.py [--num-seqs 256] [--in-len 512] [--out-len 512] [--skip-batch]

Workload: num_seqs random prompts of in_len tokens, out_len new tokens each (ignore_eos), greedy,
bf16 random weights of Qwen3-0.6B's shape. Measured in this one run on this one card:
  * copy bandwidth (device-to-device copy, bytes read + written / time), and from it the decode
    roofline: every decode step reads the weights once plus every sequence's KV so far;
  * our engine (Triton attention, CUDA-graph decode), end to end incl. prefill;
  * transformers `generate` (static batch) and `generate_batch` (continuous batching).
Prints a table last; writes JSON to $OUT/gpu_bench.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from repo_path import expose_repo


def copy_bandwidth(torch) -> float:
    n = 512 * 2**20  # 1 GiB of bf16 per buffer
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * src.numel() * src.element_size() / times[len(times) // 2]


def roofline(
    config, weight_bytes: int, num_seqs: int, in_len: int, out_len: int, bandwidth: float
) -> float:
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2
    total = 0.0
    for step in range(out_len):
        total += weight_bytes + num_seqs * (in_len + step) * kv_per_token
    return num_seqs * out_len / (total / bandwidth)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--in-len", type=int, default=512)
    parser.add_argument("--out-len", type=int, default=512)
    parser.add_argument("--skip-hf", action="store_true", help="only our engine and the roofline")
    parser.add_argument(
        "--skip-batch", action="store_true", help="skip transformers generate_batch"
    )
    parser.add_argument(
        "--batch-seqs", type=int, default=None, help="sequences for generate_batch (default: all)"
    )
    parser.add_argument("--profile", action="store_true", help="cProfile the engine thread's steps")
    parser.add_argument(
        "--eager", action="store_true", help="our engine without CUDA graphs (ablation)"
    )
    args = parser.parse_args()
    expose_repo()
    import torch

    from rollout_accel.serving.engine import Engine
    from rollout_accel.serving.models import save_model_dir

    results: dict = {
        "card": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "workload": vars(args),
    }
    try:
        import triton

        results["triton"] = triton.__version__
    except ImportError:
        pass
    bandwidth = copy_bandwidth(torch)
    results["copy_bandwidth_GBps"] = bandwidth / 1e9
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)

    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(300, 150_000, (args.num_seqs, args.in_len), generator=gen).tolist()
    params = {"temperature": 0, "max_new_tokens": args.out_len, "ignore_eos": True}

    t0 = time.perf_counter()
    engine = Engine(
        "qwen3-0.6b-shape",
        device="cuda",
        dtype="bfloat16",
        max_running_requests=args.num_seqs,
        cuda_graph_max_bs=args.num_seqs,
        context_length=args.in_len + args.out_len + 64,
        max_prefill_tokens=16384,
        cuda_graph=not args.eager,
    )
    results["engine_startup_s"] = time.perf_counter() - t0
    cfg = engine.model_config
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    results["roofline_tokens_per_s"] = roofline(
        cfg, weight_bytes, args.num_seqs, args.in_len, args.out_len, bandwidth
    )
    warm = torch.randint(300, 150_000, (16, 64), generator=gen).tolist()
    engine.generate(input_ids=warm, sampling_params={**params, "max_new_tokens": 32})
    engine.flush_cache()
    torch.cuda.synchronize()
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        step = engine.loop._step

        def profiled_step() -> bool:
            profiler.enable()
            try:
                return step()
            finally:
                profiler.disable()

        engine.loop._step = profiled_step
    from rollout_accel.serving.engine.engine_loop import LoopTiming

    engine.loop.timing = LoopTiming()
    t0 = time.perf_counter()
    outs = engine.generate(input_ids=prompts, sampling_params=params)
    elapsed = time.perf_counter() - t0
    if profiler is not None:
        import pstats

        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    produced = sum(o["meta_info"]["completion_tokens"] for o in outs)
    assert produced == args.num_seqs * args.out_len, produced
    results["engine_s"] = elapsed
    results["engine_tokens_per_s"] = produced / elapsed
    results["engine_graph_steps"] = engine.runner.graphs.replays if engine.runner.graphs else 0
    results["engine_steps"] = engine.scheduler.stats.steps
    results["engine_thread_ms_per_step"] = engine.loop.timing.per_step_ms()
    print(
        "engine thread per step (ms):",
        {k: round(v, 3) for k, v in results["engine_thread_ms_per_step"].items()},
        flush=True,
    )
    print(
        f"engine {produced / elapsed:.0f} tok/s ({elapsed:.1f} s, {results['engine_steps']} steps)",
        flush=True,
    )

    if not args.skip_hf:
        import transformers

        results["transformers"] = transformers.__version__
        with tempfile.TemporaryDirectory() as tmp:
            from rollout_accel.serving.models.loader import LoadedModel

            save_model_dir(
                LoadedModel(engine.model, engine.tokenizer, cfg, "qwen3-0.6b-shape"), tmp
            )
            engine.shutdown()
            del engine
            torch.cuda.empty_cache()
            hf = (
                transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16)
                .cuda()
                .eval()
            )
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 0
        ids = torch.tensor(prompts, device="cuda")
        with torch.inference_mode():
            hf.generate(ids[:8, :64], max_new_tokens=8, do_sample=False)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.out_len,
                do_sample=False,
            )
            torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
        new = (out.shape[1] - args.in_len) * args.num_seqs
        results["hf_generate_s"] = elapsed
        results["hf_generate_tokens_per_s"] = new / elapsed
        print(f"transformers generate {new / elapsed:.0f} tok/s ({elapsed:.1f} s)", flush=True)
        del out
        if not args.skip_batch:
            count = args.batch_seqs or args.num_seqs
            try:
                gc = transformers.GenerationConfig(
                    max_new_tokens=args.out_len, do_sample=False, eos_token_id=None, pad_token_id=0
                )
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                batch_out = hf.generate_batch(inputs=prompts[:count], generation_config=gc)
                torch.cuda.synchronize()
                elapsed = time.perf_counter() - t0
                tokens = sum(
                    len(getattr(r, "generated_tokens", []) or []) for r in batch_out.values()
                )
                tokens = tokens or count * args.out_len
                results["hf_generate_batch_seqs"] = count
                results["hf_generate_batch_s"] = elapsed
                results["hf_generate_batch_tokens_per_s"] = tokens / elapsed
                print(
                    f"transformers generate_batch {tokens / elapsed:.0f} tok/s ({elapsed:.1f} s, {count} seqs)",
                    flush=True,
                )
            except Exception as exc:  # API drift across transformers versions: report, don't die
                results["hf_generate_batch_error"] = f"{type(exc).__name__}: {exc}"
                print("generate_batch failed:", results["hf_generate_batch_error"], flush=True)
    else:
        engine.shutdown()

    roof = results["roofline_tokens_per_s"]
    rows = [("roofline (decode, measured copy BW)", roof)]
    rows.append(("rollout-accel engine", results["engine_tokens_per_s"]))
    for key, name in (
        ("hf_generate_tokens_per_s", "transformers generate"),
        ("hf_generate_batch_tokens_per_s", "transformers generate_batch"),
    ):
        if key in results:
            rows.append((name, results[key]))
    print(
        f"\n{results['card']}: {args.num_seqs} seqs x {args.in_len} in / {args.out_len} out, bf16 qwen3-0.6b-shape"
    )
    print(f"{'path':<38}{'out tok/s':>12}{'of roofline':>13}")
    for name, value in rows:
        print(f"{name:<38}{value:>12.0f}{value / roof:>12.0%}")
    if "hf_generate_tokens_per_s" in results:
        ratio = results["engine_tokens_per_s"] / results["hf_generate_tokens_per_s"]
        results["engine_over_hf_generate"] = ratio
        print(f"engine / transformers generate: {ratio:.1f}x")
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir, "gpu_bench.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
