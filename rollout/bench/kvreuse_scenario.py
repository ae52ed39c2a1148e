"""`rollout bench --scenario kvreuse`: cross-agent KV reuse vs full prefill, speed and quality.

The multi-agent stream (`serving.kvreuse.workload`) is prefilled prompt by prompt twice over the
same model and pool shape: full prefill with the radix cache (the baseline), and chunk reuse +
selective recompute (radix cache on too) at each recompute ratio r. Per model it reports TTFT
(prefill wall time, host-synced) p50/p99 of both, prefill tokens computed, the reuse ratio, and
quality against full prefill of the same prompt (next-token KL, top-1, greedy-32 agreement) over
the prompts that reused anything — the curve over r.

Models: `toy` is the local loop's SFT-warm-started arithmetic policy (recipes/local/
arithmetic-sync.toml; its checkpoint is built once and cached like `rollout train` does), whose
outputs mean something: its stream's documents and outputs are worked arithmetic and each prompt
ends in a question it was trained to answer. Presets (`tiny-qwen3`, ...) are random-weight
models on a random-token stream. Results: `<out>/kvreuse.json`; a table is printed last.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from rollout_accel.serving.kvreuse.blend import BlendSettings
from rollout_accel.serving.kvreuse.prefiller import ReusePrefiller
from rollout_accel.serving.kvreuse.quality import compare, greedy_decode, summarize
from rollout_accel.serving.kvreuse.workload import (
    AgentPrompt,
    MultiAgentConfig,
    TextSource,
    multi_agent_stream,
    random_tokens,
    reusable_share,
)
from rollout_accel.serving.models.decoder import CausalLM

DEFAULT_RATIOS = (0.0, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0)
MAIN_RATIO = 0.15
# The toy policy's positions stop at 512 (recipe model.max_positions): a smaller stream.
# TOY_CONTEXT shapes the contexts the toy policy's SFT sees (rounds play no part there; the SFT
# cache key holds this exact value); the toy stream is the same shape over more rounds.
TOY_CONTEXT = MultiAgentConfig(
    agents=4,
    rounds=3,
    documents=3,
    document_tokens=96,
    system_tokens=16,
    instruction_tokens=16,
    output_tokens=32,
    question_tokens=8,
)
TOY_WORKLOAD = replace(TOY_CONTEXT, rounds=8)
PRESET_WORKLOAD = MultiAgentConfig()


@dataclass(slots=True)
class StreamRun:
    """One pass over the stream: per-prompt TTFT, logits, greedy tokens, and counters."""

    seconds: list[float]
    logits: list[torch.Tensor]
    tokens: list[list[int]]
    reused: list[int]
    metrics: dict[str, Any]


# -- the toy policy and its text ------------------------------------------------------------------


def toy_policy(
    layers: int, device: str, cache_root: str, context: MultiAgentConfig | None = TOY_CONTEXT
) -> tuple[CausalLM, Any]:
    """The local loop's SFT warm start (recipes/local/arithmetic-sync.toml: same task, shape,
    init, SFT data and schedule) with `layers` decoder layers, trained on `device` and cached as a
    state dict under `cache_root`. Built here rather than through `rollout.local` so it runs on
    bare GPU images (no aiohttp / HTTP stack): the steps are those of
    `rollout.local.checkpoint.ensure_sft_checkpoint`. With 2 layers (the recipe's) and check
    layer 1 every K/V is recomputed, so the default here is deeper.

    `context`: the recipe's policy only ever saw `<bos>problem=` and answers garbage after any
    other text, so by default each SFT prompt is preceded by a multi-agent context drawn like the
    stream's (system words, instructions, worked-arithmetic documents and outputs, of random
    size up to the stream's): the policy then answers the final question in such contexts, and
    its next-token distribution there is something reuse can keep or break. None: the recipe's
    SFT data unchanged."""
    from rollout_accel.rollout.frontier import find_default_recipe
    from rollout_accel.rollout.recipe import load_recipe
    from rollout_accel.rollout.tasks import get_task
    from rollout_accel.rollout.trainer.sft import SFTConfig, build_sft_examples, sft_train
    from rollout_accel.serving.models import ModelConfig
    from rollout_accel.serving.models.presets import init_random_weights

    recipe = load_recipe(find_default_recipe(), [f"model.layers={layers}"])
    task = get_task(recipe.task.name, **recipe.task.options)
    spec, tok = recipe.model, task.tokenizer
    config = ModelConfig(
        architecture="qwen3",
        vocab_size=tok.vocab_size,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.hidden // spec.heads,
        rope_theta=10_000.0,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        eos_token_ids=(tok.eos_id,),
        bos_token_id=tok.bos_id,
    )
    key = json.dumps(
        [
            asdict(spec),
            asdict(recipe.train),
            recipe.task.options,
            recipe.task.sft_size,
            recipe.run.seed,
            list(tok.vocab),
            None if context is None else asdict(context),
        ],
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    path = (
        Path(cache_root)
        / f"toy-{recipe.task.name}-l{layers}-sft{recipe.train.sft_steps}-{digest}.pt"
    )
    model = CausalLM(config)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu"))
        return model.to(device).eval(), task
    init_random_weights(model, 0.02, recipe.run.seed)  # checkpoint.INIT_STD
    model.to(device)
    problems = task.train_prompts(recipe.task.sft_size, seed=recipe.run.seed + 1_000_003)
    examples = build_sft_examples(task, problems)
    if context is not None:
        examples = with_contexts(examples, task, context, recipe.run.seed)
    with torch.enable_grad():
        sft_train(
            model,
            examples,
            SFTConfig(
                steps=recipe.train.sft_steps,
                batch_size=recipe.train.sft_batch_size,
                lr=recipe.train.sft_lr,
                pad_id=tok.pad_id,
                seed=recipe.run.seed,
            ),
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)
    return model.eval(), task


def with_contexts(
    examples: list[Any], task: Any, context: MultiAgentConfig, seed: int
) -> list[Any]:
    """Each SFT example's prompt (`<bos>problem=`) becomes `<bos>` + a random multi-agent
    context + `\n` + problem + `=`, the stream's prompt shape; targets unchanged."""
    from rollout_accel.rollout.trainer.sft import SFTExample

    rng = random.Random(seed + 7)
    source = arithmetic_text(task)
    nl = task.tokenizer.encode("\n")
    out = []
    for ex in examples:
        ctx = source(rng, "system", rng.randint(0, context.system_tokens))
        ctx += source(rng, "instruction", rng.randint(0, context.instruction_tokens))
        for _ in range(rng.randint(0, context.documents + context.agents - 1)):
            kind = rng.choice(("document", "output"))
            size = context.document_tokens if kind == "document" else context.output_tokens
            ctx += source(rng, kind, rng.randint(1, size))
        prompt = [ex.prompt_ids[0], *ctx, *nl, *ex.prompt_ids[1:]]
        out.append(SFTExample(prompt_ids=prompt, target_ids=ex.target_ids))
    return out


def arithmetic_text(task: Any) -> TextSource:
    """Worked arithmetic as the documents / other agents' outputs, a fresh problem as the
    question, short lowercase words as system prompt and instructions; char-tokenized."""
    from rollout_accel.rollout.tasks.arithmetic import make_problem

    tok = task.tokenizer

    def problem(rng: random.Random):
        steps = rng.randint(1, 3)
        return make_problem(
            [rng.randint(0, 9) for _ in range(steps + 1)],
            [rng.choice("+-") for _ in range(steps)],
        )

    def source(rng: random.Random, kind: str, length: int) -> list[int]:
        if kind == "question":
            return tok.encode("\n" + problem(rng).prompt)
        if length <= 0:
            return []
        if kind in ("system", "instruction"):
            words = []
            while sum(len(w) + 1 for w in words) < length:
                words.append(
                    "".join(
                        rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 6))
                    )
                )
            return tok.encode((" ".join(words) + ":")[-length:])
        text = ""
        while len(text) < length:
            p = problem(rng)
            text += p.prompt + p.solution + ";"
        return tok.encode(text[:length])

    return source


# -- running ------------------------------------------------------------------------------------


def pool_slots(prompts: Sequence[AgentPrompt], steps: int) -> int:
    """Enough slots that nothing is evicted: every prompt (radix), every distinct segment
    (chunks), one decode."""
    distinct = {tuple(p.input_ids[s:e]) for p in prompts for s, e in p.segments}
    return sum(len(p.input_ids) for p in prompts) + sum(map(len, distinct)) + steps + 64


def run_streams(
    model: CausalLM,
    prompts: Sequence[AgentPrompt],
    settings: Sequence[BlendSettings | None],
    steps: int,
    min_tokens: int,
) -> list[StreamRun]:
    """One fresh pool per entry of `settings` (None: the full-prefill baseline). The runs go
    through the stream in lockstep — prompt i on every pool, in rotating order, before prompt
    i + 1 — so load on a shared machine hits them alike. Each prompt is prefilled (timed),
    decodes `steps` greedy tokens (untimed) and is handed to the radix cache."""
    need = pool_slots(prompts, steps)
    pools = [ReusePrefiller.create(model, need, s, min_tokens) for s in settings]
    runs = [StreamRun([], [], [], [], {}) for _ in settings]
    for i, prompt in enumerate(prompts):
        for k in range(len(pools)):
            j = (i + k) % len(pools)
            pf, run = pools[j], runs[j]
            out = pf.prefill(prompt.input_ids, prompt.segments)
            run.seconds.append(out.seconds)
            run.logits.append(out.logits.float().cpu())
            run.reused.append(out.blend.reused_tokens if out.blend is not None else 0)
            run.tokens.append(
                greedy_decode(
                    model,
                    pf.cache,
                    out.slots,
                    out.logits,
                    steps,
                    pf.alloc,
                    pf.allocator.free,
                    stop_ids=model.config.eos_token_ids,
                )
                if steps
                else []
            )
            pf.finish(out)
    for pf, run in zip(pools, runs, strict=True):
        run.metrics = pf.metrics.as_dict()
    return runs


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def evaluate_model(
    label: str,
    model: CausalLM,
    prompts: Sequence[AgentPrompt],
    ratios: Sequence[float],
    check_layer: int,
    steps: int,
    min_tokens: int,
    warmup: bool = True,
) -> dict[str, Any]:
    """Baseline + one run per ratio; TTFT, work, reuse and quality vs the baseline."""
    model.eval()
    if warmup:  # kernels, allocator and caches warm before anything is timed
        run_streams(
            model, prompts[:6], [None, BlendSettings(MAIN_RATIO, check_layer)], 2, min_tokens
        )
    settings = [None] + [BlendSettings(r, check_layer) for r in ratios]
    base, *runs = run_streams(model, prompts, settings, steps, min_tokens)
    reuse_idx = [i for i, n in enumerate(runs[0].reused) if n > 0] if runs else []
    curve = []
    for ratio, run in zip(ratios, runs, strict=True):
        records = [
            compare(base.logits[i], base.tokens[i], run.logits[i], run.tokens[i]) for i in reuse_idx
        ]
        base_t = [base.seconds[i] for i in reuse_idx]
        run_t = [run.seconds[i] for i in reuse_idx]
        m = run.metrics
        curve.append(
            {
                "ratio": ratio,
                "ttft_p50_ms": 1e3 * _pct(run_t, 0.5),
                "ttft_p99_ms": 1e3 * _pct(run_t, 0.99),
                "speedup_p50": _pct(base_t, 0.5) / max(_pct(run_t, 0.5), 1e-12),
                "speedup_mean": sum(base_t) / max(sum(run_t), 1e-12),
                "computed_tokens": m["computed_tokens"],
                "reuse_ratio": m["reused_tokens"] / max(m["prompt_tokens"], 1),
                "recomputed_reused_tokens": m["recomputed_reused_tokens"],
                "fallbacks": m["fallbacks"],
                "quality": summarize(records),
            }
        )
    idx = reuse_idx
    bm = base.metrics
    return {
        "model": label,
        "layers": model.config.num_hidden_layers,
        "prompts": len(prompts),
        "prompts_with_reuse": len(idx),
        "prompt_tokens": bm["prompt_tokens"],
        "reusable_share": reusable_share(list(prompts)),
        "baseline": {
            "ttft_p50_ms": 1e3 * _pct([base.seconds[i] for i in idx] or [0.0], 0.5),
            "ttft_p99_ms": 1e3 * _pct([base.seconds[i] for i in idx] or [0.0], 0.99),
            "computed_tokens": bm["computed_tokens"],
            "radix_cached_tokens": bm["radix_cached_tokens"],
        },
        "check_layer": check_layer,
        "greedy_steps": steps,
        "curve": curve,
    }


def table(results: Sequence[dict[str, Any]]) -> str:
    lines = [
        "model          r      TTFT p50/p99 ms (full)    speedup  computed/full  reuse   KL mean   top1   greedy",
    ]
    for res in results:
        b = res["baseline"]
        for point in res["curve"]:
            q = point["quality"]
            lines.append(
                f"{res['model']:<14} {point['ratio']:<5.2f}  "
                f"{point['ttft_p50_ms']:7.2f}/{point['ttft_p99_ms']:7.2f} "
                f"({b['ttft_p50_ms']:6.2f}/{b['ttft_p99_ms']:6.2f})  "
                f"{point['speedup_p50']:6.2f}x  "
                f"{point['computed_tokens'] / max(b['computed_tokens'], 1e-9):12.2f}  "
                f"{point['reuse_ratio']:5.2f}  {q.get('kl_mean', float('nan')):8.4f}  "
                f"{q.get('top1_agreement', float('nan')):5.2f}  {q.get('greedy_agreement', float('nan')):6.2f}"
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rollout bench --scenario kvreuse",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--models",
        default="toy,tiny-qwen3",
        help="comma-separated: toy (the local loop's SFT policy) and/or presets (default toy,tiny-qwen3)",
    )
    p.add_argument(
        "--ratios",
        default=",".join(str(r) for r in DEFAULT_RATIOS),
        help="recompute ratios r to run (the curve; default 0,0.05,0.1,0.15,0.25,0.5,1)",
    )
    p.add_argument(
        "--check-layer", type=int, default=1, help="layer where deviations are measured (default 1)"
    )
    p.add_argument(
        "--greedy-steps",
        type=int,
        default=32,
        help="greedy continuation length compared (default 32)",
    )
    p.add_argument(
        "--min-chunk-tokens", type=int, default=16, help="shortest segment stored (default 16)"
    )
    p.add_argument("--agents", type=int, default=None, help="agents (default 4)")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 3)")
    p.add_argument(
        "--document-tokens",
        type=int,
        default=None,
        help="tokens per shared document (default 96 toy, 256 presets)",
    )
    p.add_argument(
        "--output-tokens",
        type=int,
        default=None,
        help="tokens per agent output (default 32 toy, 64 presets)",
    )
    p.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16 (presets)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: steadier timings on a shared machine)",
    )
    p.add_argument(
        "--toy-layers",
        type=int,
        default=6,
        help="decoder layers of the toy policy (default 6; the recipe's 2 leave nothing to reuse past check layer 1)",
    )
    p.add_argument(
        "--sft-cache",
        default="bench-out/kvreuse-sft-cache",
        help="where the toy policy's SFT weights are cached (default bench-out/kvreuse-sft-cache)",
    )
    p.add_argument(
        "--out", default="bench-out", help="directory for kvreuse.json (default bench-out)"
    )
    return p


def workload_for(label: str, args: argparse.Namespace) -> MultiAgentConfig:
    base = TOY_WORKLOAD if label == "toy" else PRESET_WORKLOAD
    changes = {
        k: v
        for k, v in {
            "agents": args.agents,
            "rounds": args.rounds,
            "document_tokens": args.document_tokens,
            "output_tokens": args.output_tokens,
        }.items()
        if v is not None
    }
    return replace(base, seed=args.seed, **changes)


def load(label: str, args: argparse.Namespace) -> tuple[CausalLM, list[AgentPrompt]]:
    from rollout_accel.serving.models import load_model

    config = workload_for(label, args)
    if label == "toy":
        model, task = toy_policy(args.toy_layers, args.device, args.sft_cache)
        prompts = multi_agent_stream(config, arithmetic_text(task), prefix=[task.tokenizer.bos_id])
    else:
        model = load_model(label, dtype=args.dtype, device=args.device).model
        prompts = multi_agent_stream(config, random_tokens(model.config.vocab_size))
    model.fuse_projections()
    return model, prompts


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        print(f"rollout bench: error: --ratios: not a list of numbers: {args.ratios!r}")
        return 2
    if not ratios or any(not 0.0 <= r <= 1.0 for r in ratios):
        print("rollout bench: error: --ratios: every ratio must be in [0, 1]")
        return 2
    threads = torch.get_num_threads()
    if args.device == "cpu":
        torch.set_num_threads(max(1, args.threads))
    try:
        return _run(args, ratios)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, ratios: list[float]) -> int:
    results = []
    start = time.perf_counter()
    for label in [m.strip() for m in args.models.split(",") if m.strip()]:
        model, prompts = load(label, args)
        with torch.inference_mode():
            res = evaluate_model(
                label,
                model,
                prompts,
                ratios,
                args.check_layer,
                args.greedy_steps,
                args.min_chunk_tokens,
            )
        res["workload"] = asdict(workload_for(label, args))
        results.append(res)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "schema": 1,
        "scenario": "kvreuse",
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - start,
        "results": results,
    }
    (out / "kvreuse.json").write_text(json.dumps(payload, indent=2))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
