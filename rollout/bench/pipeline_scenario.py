"""`rollout bench --scenario pipeline`: pipeline-parallel decode with an even layer split, the best
static split (found offline from the even run's timings) and dynamic rebalancing, in one run.

Workload (rollout-shaped, seeded): `--num-seqs` requests start together with prompts of 32-96
tokens; response lengths are long-tailed (log-normal, median max_len / 3, capped at `--max-len`),
so contexts grow while the batch shrinks, as in an RL rollout step. Sampling as slime runs it:
temperature 0.8 with top-p (`--top-p`, default 0.9), plus a greedy pass reported separately.
Every mode runs the same requests on the same engine; their tokens must be identical (a mode
that changed a token is a bug: the run exits non-zero after writing its results).

Per mode: mean / p90 step latency, output tokens/s, bubble fraction per stage (1 - busy / step
time), the predictor's out-of-sample error, and the partition timeline.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

MODES = ("even", "best-static", "dynamic")


def make_workload(
    num_seqs: int, max_len: int, seed: int, vocab: int
) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_seqs):
        prompt = rng.integers(1, min(vocab, 256), int(rng.integers(32, 97))).tolist()
        length = int(np.clip(rng.lognormal(np.log(max_len / 3), 0.6), 8, max_len))
        out.append((prompt, length))
    return out


def _sampling(work, temperature: float, top_p: float) -> list[dict[str, Any]]:
    return [
        {
            "max_new_tokens": n,
            "ignore_eos": True,
            "temperature": temperature,
            "top_p": top_p,
            "sampling_seed": 1000 + i,
        }
        for i, (_, n) in enumerate(work)
    ]


def _all_bounds(num_layers: int, pp: int):
    for cuts in itertools.combinations(range(1, num_layers), pp - 1):
        yield (0, *cuts, num_layers)


def best_static_bounds(runner: Any, history: list[dict[str, Any]]) -> tuple[int, ...]:
    """The fixed split with the least total predicted bottleneck over the recorded steps."""
    pred = runner.predictor
    pp = runner.pp_size
    layers = runner.model.config.num_hidden_layers

    def total(bounds: tuple[int, ...]) -> float:
        cost = 0.0
        for step in history:
            cost += max(
                sum(
                    pred.stage_time(i, f, bounds[i + 1] - bounds[i]) for f in step["micro_features"]
                )
                for i in range(pp)
            )
        return cost

    return min(_all_bounds(layers, pp), key=total)


def _run_mode(engine: Any, mode: str, work, sampling, bounds) -> dict[str, Any]:
    from rollout_accel.serving.pipeline.latency import LatencyPredictor
    from rollout_accel.serving.pipeline.rebalance import Rebalancer

    runner = engine.runner
    engine.flush_cache()

    def setup() -> None:
        runner.request_bounds(bounds)
        runner.finish_moves()  # each mode starts from its split
        runner.rebalance = mode == "dynamic"
        runner.predictor = LatencyPredictor(runner.pp_size)  # every mode learns from scratch
        runner.rebalancer = Rebalancer(runner.model.config.num_hidden_layers, runner.pp_size)
        runner.timeline = runner.timeline[:0]
        runner.record_features = True

    engine.loop.call(setup)
    first = runner.steps
    t0 = time.perf_counter()
    outs = engine.generate(input_ids=[p for p, _ in work], sampling_params=sampling)
    seconds = time.perf_counter() - t0
    history = [h for h in runner.history if h["step"] > first]
    walls = np.array([h["wall"] for h in history])
    busy = np.array([h["busy"] for h in history])
    decode = [h for h in history if h["tokens"] == h["batch"]]
    tokens = sum(len(o["output_ids"]) for o in outs)
    return {
        "mode": mode,
        "initial_bounds": list(bounds),
        "final_bounds": list(runner.bounds),
        "steps": len(history),
        "seconds": seconds,
        "output_tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "mean_step_ms": 1e3 * float(walls.mean()),
        "p90_step_ms": 1e3 * float(np.percentile(walls, 90)),
        "mean_decode_step_ms": 1e3 * float(np.mean([h["wall"] for h in decode]))
        if decode
        else None,
        "mean_bottleneck_ms": 1e3 * float(busy.max(axis=1).mean()),
        "bubble_per_stage": [
            float(1 - busy[:, i].sum() / walls.sum()) for i in range(busy.shape[1])
        ],
        "predictor": runner.predictor.report(),
        "timeline": [{**t, "step": t["step"] - first} for t in runner.timeline],
        "history": history,
        "output_ids": [o["output_ids"] for o in outs],
    }


def run_pipeline_bench(
    model: str,
    pp_size: int,
    num_seqs: int,
    max_len: int,
    top_p: float,
    seed: int = 0,
    micro_batches: int = 0,
    greedy_pass: bool = True,
    **engine_args: Any,
) -> dict[str, Any]:
    """Runs every mode (and a greedy pass of even vs dynamic) on one engine; returns the results."""
    from rollout_accel.serving.engine import Engine
    from rollout_accel.serving.pipeline.partition import even_bounds

    engine = Engine(
        model,
        pp_size=pp_size,
        pp_microbatches=micro_batches,
        max_running_requests=max(num_seqs, 8),
        seed=seed,
        **engine_args,
    )
    try:
        runner = engine.runner
        layers = engine.model_config.num_hidden_layers
        vocab = engine.model_config.vocab_size
        work = make_workload(num_seqs, max_len, seed, vocab)
        sampling = _sampling(work, 0.8, top_p)
        even = even_bounds(layers, pp_size)
        # Warm-up (allocator, kernels), not measured.
        engine.generate(
            input_ids=[p for p, _ in work[:4]], sampling_params=_sampling(work[:4], 0.8, top_p)
        )
        runs = {"even": _run_mode(engine, "even", work, sampling, even)}
        static = best_static_bounds(runner, runs["even"]["history"])
        runs["best-static"] = _run_mode(engine, "best-static", work, sampling, static)
        runs["dynamic"] = _run_mode(engine, "dynamic", work, sampling, even)
        greedy = {}
        if greedy_pass:
            g = _sampling(work, 0.0, 1.0)
            greedy = {m: _run_mode(engine, m, work, g, even) for m in ("even", "dynamic")}
    finally:
        engine.shutdown()
    reference = runs["even"]["output_ids"]
    token_check = {name: run["output_ids"] == reference for name, run in runs.items()}
    if greedy:
        token_check["greedy-dynamic"] = (
            greedy["dynamic"]["output_ids"] == greedy["even"]["output_ids"]
        )
    for run in [*runs.values(), *greedy.values()]:
        run.pop("output_ids")
        run["history"] = [
            {k: v for k, v in h.items() if k != "micro_features"} for h in run["history"]
        ]
    return {
        "model": model,
        "pp_size": pp_size,
        "num_seqs": num_seqs,
        "max_len": max_len,
        "top_p": top_p,
        "micro_batches": micro_batches or pp_size,
        "modes": runs,
        "greedy": greedy,
        "tokens_identical": token_check,
    }


def format_table(result: dict[str, Any]) -> str:
    rows = [("top-p", m, r) for m, r in result["modes"].items()]
    rows += [("greedy", m, r) for m, r in result["greedy"].items()]
    base = {kind: next(r for k, m, r in rows if k == kind and m == "even") for kind, _, _ in rows}
    lines = [
        f"pipeline bench: {result['model']}, pp={result['pp_size']}, {result['num_seqs']} seqs, "
        f"max_len {result['max_len']}, micro-batches {result['micro_batches']}",
        f"{'sampling':8} {'mode':12} {'step ms':>8} {'vs even':>8} {'p90 ms':>7} {'bneck ms':>8} "
        f"{'tok/s':>8} {'bubble/stage':>16} {'pred err':>12} {'partition (final)':>18}",
    ]
    for kind, mode, r in rows:
        ratio = r["mean_step_ms"] / base[kind]["mean_step_ms"]
        bubble = "/".join(f"{b:.2f}" for b in r["bubble_per_stage"])
        err = "/".join(f"{e:.2f}" for e in r["predictor"]["mean_rel_error"])
        lines.append(
            f"{kind:8} {mode:12} {r['mean_step_ms']:8.2f} {ratio:8.3f} {r['p90_step_ms']:7.2f} "
            f"{r['mean_bottleneck_ms']:8.2f} {r['tokens_per_s']:8.1f} {bubble:>16} {err:>12} "
            f"{r['final_bounds']!s:>18}"
        )
    bad = [name for name, same in result["tokens_identical"].items() if not same]
    lines.append(
        "tokens identical across modes: "
        + ("yes" if not bad else f"NO ({', '.join(bad)} differ from even: a bug)")
    )
    timeline = result["modes"]["dynamic"]["timeline"]
    lines.append(
        "dynamic timeline (top-p): "
        + ", ".join(f"step {t['step']}: {t['bounds']}" for t in timeline)
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="rollout bench --scenario pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="tiny-qwen3-8l-32k", help="preset or HF-layout dir")
    parser.add_argument("--pp-size", type=int, default=2)
    parser.add_argument("--num-seqs", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=96, help="response length cap")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--micro-batches", type=int, default=0, help="per step; 0 = pp-size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-total-tokens", type=int, default=16_384)
    parser.add_argument("--no-greedy", action="store_true", help="skip the greedy pass")
    parser.add_argument("--out", default=None, help="JSON path (default $OUT/pipeline_bench.json)")
    args = parser.parse_args(argv)
    result = run_pipeline_bench(
        args.model,
        args.pp_size,
        args.num_seqs,
        args.max_len,
        args.top_p,
        seed=args.seed,
        micro_batches=args.micro_batches,
        greedy_pass=not args.no_greedy,
        max_total_tokens=args.max_total_tokens,
    )
    out = Path(args.out or Path(os.environ.get("OUT", "out")) / "pipeline_bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    print(f"wrote {out}")
    print(format_table(result))
    if not all(result["tokens_identical"].values()):
        raise SystemExit("pipeline bench: a mode changed the sampled tokens")
    return result


if __name__ == "__main__":
    main()
