"""Speculative decoding from earlier samples, on the GPU: speed-up vs overlap, and the cost of
useless drafts.

    python scripts/gpu_spec_bench.py [--prompts 64] [--samples 4] [--in-len 256] [--out-len 256]
                                     [--draft-tokens 6] [--scales 1,4,16,32,64,128]
                                     [--max-running 64]

Workload: qwen3-0.6b-shape, bf16 random weights, prompts x samples = 256 sequences (default),
temperature 1, ignore_eos, seeded per sequence. The model's output entropy is set by a logit
scale s (the final RMSNorm weight times s, so logits scale by s at temperature 1): larger s,
lower entropy, more overlap between two samples of one prompt (on tiny-qwen3, CPU: s = 32 gives
~14% 4-gram overlap, s = 128 ~58%; the script measures it for this model). Per scale, in this one run:
  1. history: one earlier sample per (prompt, sample) with other seeds, speculation off; each
     prompt's samples become one external corpus (the controller's earlier-epoch drafts);
  2. plain: the measured samples, speculation off;
  3. spec: the same seeds, speculation on, each request naming its prompt's corpus;
  4. random (once, at the first scale): every row gets random drafts (the adaptive proposer
     should stop drafting them), to bound the cost of useless drafts.
Reported: overlap (share of a plain sample's 4-grams found in its prompt's history samples, and
the share of its tokens the spec run accepted from drafts), decode tokens/s plain vs spec and the
ratio, mean accepted tokens per verify step, and how many sequences differ between plain and spec
(bf16: a q_len > 1 forward may round differently from q_len = 1; a sequence may then diverge at a
near-tie), with the first divergence position. Prints a table last; JSON to $OUT/gpu_spec_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

from repo_path import expose_repo


def ngram_overlap(sample: list[int], history: list[list[int]], n: int = 4) -> float:
    """Share of `sample`'s n-grams that occur in any of `history`."""
    seen = {tuple(h[i : i + n]) for h in history for i in range(len(h) - n + 1)}
    grams = [tuple(sample[i : i + n]) for i in range(len(sample) - n + 1)]
    return sum(g in seen for g in grams) / max(1, len(grams))


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def kernel_timing(torch, rows: int, q_stride: int, context: int) -> dict[str, float]:
    """Verify attention (fixed stride) vs the prefill kernel on the same extend rows, and the
    decode kernel on one token per row: bf16, 16/8 heads, head_dim 128, page_size 1."""
    from triton.testing import do_bench

    from rollout_accel.kernels.paged_attention_triton import (
        paged_decode_attention,
        paged_prefill_attention,
    )
    from rollout_accel.kernels.verify_attention_triton import paged_verify_attention

    dev, dt, hq, hkv, d = "cuda", torch.bfloat16, 16, 8, 128
    slots = rows * (context + q_stride) + 1
    k = torch.randn(slots, hkv, d, device=dev, dtype=dt)
    v = torch.randn_like(k)
    table = torch.randperm(slots - 1, device=dev)[: rows * (context + q_stride)].view(rows, -1)
    table = (table + 1).to(torch.int32)
    seq = torch.full((rows,), context + q_stride, device=dev, dtype=torch.int32)
    q = torch.randn(rows * q_stride, hq, d, device=dev, dtype=dt)
    cu = torch.arange(rows + 1, device=dev, dtype=torch.int32) * q_stride
    scale = d**-0.5
    verify_ms = do_bench(
        lambda: paged_verify_attention(q, k, v, table, cu, seq, 1, scale, q_stride)
    )
    prefill_ms = do_bench(
        lambda: paged_prefill_attention(q, k, v, table, cu, seq, 1, scale, q_stride)
    )
    q1 = torch.randn(rows, hq, d, device=dev, dtype=dt)
    decode_ms = do_bench(lambda: paged_decode_attention(q1, k, v, table, seq, 1, scale))
    return {
        "rows": rows,
        "q_stride": q_stride,
        "context": context,
        "verify_ms": verify_ms,
        "prefill_kernel_ms": prefill_ms,
        "decode_q1_ms": decode_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="qwen3-0.6b-shape")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--in-len", type=int, default=256)
    parser.add_argument("--out-len", type=int, default=256)
    parser.add_argument("--draft-tokens", type=int, default=6, help="verify window (k + 1)")
    parser.add_argument("--draft-cost", type=float, default=0.1)
    parser.add_argument(
        "--max-running",
        type=int,
        default=0,
        help="engine slots (default: every request at once); fewer queues the rest, so a row "
        "that finishes early frees its slot (RL rollouts have more samples than slots)",
    )
    parser.add_argument("--scales", default="1,4,16,32,64,128")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--no-cuda-graph", action="store_true")
    parser.add_argument("--kernels-only", action="store_true", help="only the attention timings")
    args = parser.parse_args()

    expose_repo()
    import torch

    cuda = args.device.startswith("cuda")
    kernels = (
        [
            kernel_timing(torch, rows, args.draft_tokens, ctx)
            for rows, ctx in ((256, 512), (256, 2048), (16, 8192))
        ]
        if cuda
        else []  # a CPU run is a smoke test of the script
    )
    for row in kernels:
        print(json.dumps(row), flush=True)
    if args.kernels_only:
        return

    from rollout_accel.serving.engine import Engine
    from rollout_accel.serving.engine.engine_loop import LoopTiming
    from rollout_accel.serving.spec import CORPUS_FIELD, spec_of
    from rollout_accel.serving.spec.proposer import Proposer

    engine = Engine(
        args.model,
        device=args.device,
        dtype=args.dtype,
        cuda_graph=not args.no_cuda_graph,
        max_running_requests=args.max_running or args.prompts * args.samples,
        speculative_algorithm="NGRAM",
        speculative_num_draft_tokens=args.draft_tokens,
        speculative_draft_cost=args.draft_cost,
    )
    spec = spec_of(engine)
    assert spec is not None
    vocab = engine.model_config.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(args.in_len)] for _ in range(args.prompts)]
    norm = engine.model.model.norm.weight
    base_norm = norm.detach().clone()
    timings: dict[str, dict] = {}  # the last run's engine-thread time per step, by mode

    def generate(seed_base: int, corpora: bool, active: bool) -> tuple[list[dict], float]:
        spec.active = active
        ids, params = [], []
        for p, prompt in enumerate(prompts):
            for s in range(args.samples):
                custom = {CORPUS_FIELD: f"p{p}"} if corpora else None
                ids.append(prompt)
                params.append(
                    {
                        "temperature": 1.0,
                        "max_new_tokens": args.out_len,
                        "ignore_eos": True,
                        "sampling_seed": seed_base + p * args.samples + s,
                        "custom_params": custom,
                    }
                )
        if cuda:
            torch.cuda.synchronize()
        engine.loop.timing = LoopTiming()
        t0 = time.perf_counter()
        outs = engine.generate(input_ids=ids, sampling_params=params)
        if cuda:
            torch.cuda.synchronize()
        timings[("spec" if active else "plain")] = {
            "steps": engine.loop.timing.steps,
            **engine.loop.timing.per_step_ms(),
        }
        return outs, time.perf_counter() - t0

    def measure(scale: float) -> dict:
        with torch.no_grad():
            norm.copy_(base_norm * scale)
        history, _ = generate(10**7, corpora=False, active=False)
        for cid in list(spec.registry.list()):
            spec.registry.remove(cid)
        for p in range(args.prompts):
            chunks = [history[p * args.samples + s]["output_ids"] for s in range(args.samples)]
            spec.registry.add(f"p{p}", token_chunks=chunks)
        # Drafted run first, siblings reset: a plain run's outputs (the very answers) must not
        # become drafts; the history samples are in the corpora.
        spec.proposer.groups.clear()
        before = spec.totals.to_dict()
        spec_out, t_spec = generate(0, corpora=True, active=True)
        after = spec.totals.to_dict()
        plain, t_plain = generate(0, corpora=False, active=False)
        steps = after["verify_steps"] - before["verify_steps"]
        accepted = after["accepted_tokens"] - before["accepted_tokens"]
        drafted = after["draft_tokens"] - before["draft_tokens"]
        tokens = sum(len(o["output_ids"]) for o in plain)
        divergences = [
            first_divergence(a["output_ids"], b["output_ids"])
            for a, b in zip(plain, spec_out, strict=True)
        ]
        diverged = [d for d in divergences if d is not None]
        overlap = sum(
            ngram_overlap(
                plain[i]["output_ids"],
                [
                    history[(i // args.samples) * args.samples + s]["output_ids"]
                    for s in range(args.samples)
                ],
            )
            for i in range(len(plain))
        ) / len(plain)
        graphs = getattr(engine.runner, "verify_graphs", None)
        return {
            "scale": scale,
            "overlap_4gram": overlap,
            "accepted_share": accepted / tokens,
            "plain_tok_s": tokens / t_plain,
            "spec_tok_s": tokens / t_spec,
            "speedup": t_plain / t_spec,
            "tokens_per_verify": (steps + accepted) / max(1, steps),
            "accept_rate": accepted / max(1, drafted),
            "diverged_seqs": len(diverged),
            "first_divergence_min": min(diverged) if diverged else None,
            "verify_graph_replays": graphs.replays if graphs is not None else 0,
            "loop_ms_per_step": dict(timings),
        }

    scales = [float(s) for s in args.scales.split(",")]
    # Warm-up: compiles kernels, captures decode and verify graphs (discarded).
    measure(scales[-1])
    rows = []
    for scale in scales:
        rows.append(measure(scale))
        print(json.dumps(rows[-1]), flush=True)

    # Useless drafts: every lookup returns random tokens; adaptivity should switch them off.
    with torch.no_grad():
        norm.copy_(base_norm)

    class RandomDrafts(Proposer):
        def _draft(self, st, req, k):
            return [rng.randrange(vocab) for _ in range(k)]

    real = spec.proposer
    spec.proposer = RandomDrafts(spec.config, spec.registry)
    rand, t_rand = generate(5 * 10**7, corpora=False, active=True)
    plain, t_plain = generate(5 * 10**7, corpora=False, active=False)
    spec.proposer = real
    random_row = {
        "plain_tok_s": sum(len(o["output_ids"]) for o in plain) / t_plain,
        "random_tok_s": sum(len(o["output_ids"]) for o in rand) / t_rand,
        "slowdown": t_rand / t_plain - 1.0,
    }
    engine.shutdown()

    result = {
        "args": vars(args),
        "kernels": kernels,
        "curve": rows,
        "random_drafts": random_row,
    }
    out_dir = Path(os.environ.get("OUT", "out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_spec_bench.json").write_text(json.dumps(result, indent=2))
    print()
    print(
        f"{'scale':>6} {'4gram':>6} {'acc%':>6} {'plain t/s':>10} {'spec t/s':>10} "
        f"{'x':>5} {'tok/verify':>10} {'diverged':>8}"
    )
    for r in rows:
        print(
            f"{r['scale']:>6.2f} {r['overlap_4gram']:>6.2f} {100 * r['accepted_share']:>6.1f} "
            f"{r['plain_tok_s']:>10.0f} {r['spec_tok_s']:>10.0f} {r['speedup']:>5.2f} "
            f"{r['tokens_per_verify']:>10.2f} {r['diverged_seqs']:>8d}"
        )
    for r in rows:
        parts = [
            f"{mode} {t['steps']} steps: "
            + " ".join(f"{k} {t[k]:.2f}" for k in ("schedule", "launch", "process", "wait"))
            for mode, t in r["loop_ms_per_step"].items()
        ]
        print(f"scale {r['scale']:g} engine thread ms/step: " + " | ".join(parts))
    for kr in kernels:
        print(
            f"attention rows={kr['rows']} q={kr['q_stride']} ctx={kr['context']}: verify "
            f"{kr['verify_ms']:.3f} ms, prefill kernel {kr['prefill_kernel_ms']:.3f} ms, "
            f"decode (q=1) {kr['decode_q1_ms']:.3f} ms"
        )
    print(
        f"random drafts: plain {random_row['plain_tok_s']:.0f} tok/s, with random drafts "
        f"{random_row['random_tok_s']:.0f} tok/s ({100 * random_row['slowdown']:+.1f}%)"
    )


if __name__ == "__main__":
    main()
