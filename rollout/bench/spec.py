"""`rollout bench --scenario spec`: speculative decoding from earlier epochs' samples.

    rollout bench --scenario spec [--model tiny-qwen3] [--prompts 8] [--samples 4] [--epochs 3]
                                  [--out-len 128] [--logit-scale 128] [--draft-tokens 5] [--out DIR]

A policy that repeats itself: the model's logits are scaled by `--logit-scale` (its final norm
weight times the scale; temperature stays 1), so two samples of one prompt share much of their
text, as RL policies do between epochs (SPEC-RL: 50-70%; on tiny-qwen3 the default 128 gives
about 58% 4-gram overlap with the earlier samples, 32 about 14%). Epoch 0 samples every prompt `--samples` times. Every
later epoch registers, per prompt, an external corpus of all its earlier samples (SGLang's
`/add_external_corpus` semantics, `custom_params.spec_corpus_id` on each request), then runs the
epoch's seeded requests on the same engine with drafts on and off (`--repeats` times each, best
time counts; sibling indexes are reset before each drafted run so a plain run's outputs never
become drafts), and checks that the outputs are token-identical. Per epoch: 4-gram overlap with the
prompt's earlier samples, mean accepted tokens per verify step, draft hit rate (accepted /
drafted), tokens/s with and without drafts and the ratio. Prints a table; JSON to
`--out`/spec_bench.json (default $OUT or ./out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path
from typing import Any


def ngram_overlap(sample: list[int], history: list[list[int]], n: int = 4) -> float:
    """Share of `sample`'s n-grams found in any of `history` (how much of it was written before)."""
    seen = {tuple(h[i : i + n]) for h in history for i in range(len(h) - n + 1)}
    grams = [tuple(sample[i : i + n]) for i in range(len(sample) - n + 1)]
    return sum(g in seen for g in grams) / max(1, len(grams))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rollout bench --scenario spec",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="tiny-qwen3", help="preset name or HF-layout directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=4, help="samples per prompt per epoch")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--in-len", type=int, default=16)
    p.add_argument("--out-len", type=int, default=128)
    p.add_argument("--logit-scale", type=float, default=128.0)
    p.add_argument("--draft-tokens", type=int, default=5, help="verify window (k + 1)")
    p.add_argument("--draft-cost", type=float, default=0.3, help="CPU forwards are compute-bound")
    p.add_argument(
        "--max-running",
        type=int,
        default=8,
        help="concurrent sequences (fewer than prompts x samples: a stream, not one static batch)",
    )
    p.add_argument("--repeats", type=int, default=2, help="timed runs per mode (best counts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    return p


def _positive(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    for name in ("prompts", "samples", "epochs", "in_len", "out_len", "repeats", "max_running"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be >= 1")
    if args.epochs < 2:
        parser.error("--epochs: must be >= 2 (epoch 0 only writes the history)")
    if args.logit_scale <= 0:
        parser.error("--logit-scale: must be > 0")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from rollout_accel.serving.engine import Engine
    from rollout_accel.serving.spec import CORPUS_FIELD, spec_of

    engine = Engine(
        args.model,
        device=args.device,
        seed=args.seed,
        max_running_requests=args.max_running,
        speculative_algorithm="NGRAM",
        speculative_num_draft_tokens=args.draft_tokens,
        speculative_draft_cost=args.draft_cost,
    )
    try:
        spec = spec_of(engine)
        assert spec is not None
        with torch.no_grad():
            engine.model.model.norm.weight.mul_(args.logit_scale)
        rng = random.Random(args.seed)
        vocab = engine.model_config.vocab_size
        prompts = [[rng.randrange(vocab) for _ in range(args.in_len)] for _ in range(args.prompts)]
        history: list[list[list[int]]] = [[] for _ in prompts]

        def generate(epoch: int, active: bool) -> tuple[list[dict[str, Any]], float]:
            spec.active = active
            ids, params = [], []
            for p, prompt in enumerate(prompts):
                for s in range(args.samples):
                    ids.append(prompt)
                    params.append(
                        {
                            "temperature": 1.0,
                            "max_new_tokens": args.out_len,
                            "ignore_eos": True,
                            "sampling_seed": (epoch * 1000 + p) * 100 + s,
                            "custom_params": {CORPUS_FIELD: f"prompt-{p}"},
                        }
                    )
            t0 = time.perf_counter()
            outs = engine.generate(input_ids=ids, sampling_params=params)
            return outs, time.perf_counter() - t0

        rows = []
        for epoch in range(args.epochs):
            if epoch == 0:
                plain, _ = generate(epoch, active=False)
            else:
                for p, samples in enumerate(history):
                    spec.registry.remove(f"prompt-{p}")
                    spec.registry.add(f"prompt-{p}", token_chunks=samples)
                t_plain = t_spec = float("inf")
                for _ in range(args.repeats):
                    # Siblings restart from this epoch's own finished samples: a plain run's
                    # outputs are this run's answers and must not become its drafts.
                    spec.proposer.groups.clear()
                    before = spec.totals.to_dict()
                    drafted, took = generate(epoch, active=True)
                    after = spec.totals.to_dict()
                    t_spec = min(t_spec, took)
                    plain, took = generate(epoch, active=False)
                    t_plain = min(t_plain, took)
                steps = after["verify_steps"] - before["verify_steps"]
                accepted = after["accepted_tokens"] - before["accepted_tokens"]
                draft_tokens = after["draft_tokens"] - before["draft_tokens"]
                tokens = sum(o["meta_info"]["completion_tokens"] for o in plain)
                same = sum(
                    a["output_ids"] == b["output_ids"] for a, b in zip(plain, drafted, strict=True)
                )
                overlap = sum(
                    ngram_overlap(o["output_ids"], history[i // args.samples])
                    for i, o in enumerate(plain)
                ) / len(plain)
                rows.append(
                    {
                        "epoch": epoch,
                        "tokens": tokens,
                        "overlap_4gram": overlap,
                        "tokens_per_verify": (steps + accepted) / max(1, steps),
                        "draft_hit_rate": accepted / max(1, draft_tokens),
                        "plain_tok_s": tokens / t_plain,
                        "spec_tok_s": tokens / t_spec,
                        "speedup": t_plain / t_spec,
                        "identical": same,
                        "sequences": len(plain),
                    }
                )
            for i, out in enumerate(plain):
                history[i // args.samples].append(out["output_ids"])
    finally:
        engine.shutdown()
    return {
        "scenario": "spec",
        "settings": vars(args),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "epochs": rows,
    }


def table(result: dict[str, Any]) -> str:
    head = (
        f"{'epoch':>5} {'4-gram ovl':>10} {'tok/verify':>10} {'hit rate':>8} {'plain tok/s':>11} "
        f"{'spec tok/s':>10} {'speed-up':>8} {'identical':>9}"
    )
    lines = [head]
    for r in result["epochs"]:
        lines.append(
            f"{r['epoch']:>5} {r['overlap_4gram']:>10.2f} {r['tokens_per_verify']:>10.2f} "
            f"{r['draft_hit_rate']:>8.2f} "
            f"{r['plain_tok_s']:>11.1f} {r['spec_tok_s']:>10.1f} {r['speedup']:>8.2f} "
            f"{r['identical']:>4}/{r['sequences']:<4}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _positive(args, parser)
    result = run(args)
    out_dir = Path(args.out or os.environ.get("OUT", "out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "spec_bench.json").write_text(json.dumps(result, indent=2))
    print(table(result))
    return 0
