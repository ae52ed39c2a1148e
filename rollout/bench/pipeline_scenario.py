"""`rollout bench --scenario pipeline`: pipeline-parallel decode with an even layer split, the best
static split (found offline from the even run's timings) and dynamic rebalancing, in one run;
optionally (`--reference`) the same requests on a pp = 1 engine first, as the reference.

Workload (rollout-shaped, seeded): `--num-seqs` requests start together with prompts of 32-96
tokens; response lengths are long-tailed (log-normal, median max_len / 3, capped at `--max-len`),
so contexts grow while the batch shrinks, as in an RL rollout step. Sampling as slime runs it:
temperature 0.8 with top-p (`--top-p`, default 0.9, per-request seeds), plus a greedy pass
reported separately. The imbalance is the one the issue describes: the last stage also runs the
final norm, the LM head over the vocabulary and the (top-p) sampler.

Token checks: the pp modes share one engine, GEMM shapes and kernels, so their tokens must be
identical (a mode that changed a token is a bug: the run exits non-zero after writing its
results). Against pp = 1 the check is reported, not enforced: a greedy pp run with one
micro-batch has pp = 1's GEMM shapes (expected identical); with more micro-batches the GEMMs run
on fewer rows, and in bf16 a near-tie between two tokens may then flip (float32 on the CPU).

Per run: engine-loop ms per step (the same measure for pp = 1 and pp > 1), output tokens/s; for
pp runs also the stages' mean busy time, the bottleneck, bubble fraction per stage, the
predictor's out-of-sample error and the partition timeline.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Progress = Callable[[str], None]


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


class _Heartbeat:
    """Reports the engine's step count every `every` seconds while a run blocks (so a run cut
    short by a timeout still says where it was)."""

    def __init__(self, engine: Any, label: str, progress: Progress | None, every: float) -> None:
        self.engine, self.label, self.progress, self.every = engine, label, progress, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        first = self.engine.loop.timing.steps
        while not self._stop.wait(self.every):
            steps = self.engine.loop.timing.steps - first
            assert self.progress is not None
            self.progress(f"  {self.label}: {steps} steps so far")

    def __enter__(self) -> _Heartbeat:
        if self.progress is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


def _generate(
    engine: Any, label: str, work, sampling, progress: Progress | None
) -> tuple[list[Any], float, int]:
    """Runs the requests once on a flushed cache; (outputs, seconds, engine steps)."""
    engine.flush_cache()  # no prefix reuse from the previous mode
    steps0 = engine.loop.timing.steps
    t0 = time.perf_counter()
    with _Heartbeat(engine, label, progress, 10.0):
        outs = engine.generate(input_ids=[p for p, _ in work], sampling_params=sampling)
    return outs, time.perf_counter() - t0, engine.loop.timing.steps - steps0


def _common(outs: list[Any], seconds: float, steps: int) -> dict[str, Any]:
    tokens = sum(len(o["output_ids"]) for o in outs)
    return {
        "seconds": seconds,
        "steps": steps,
        "output_tokens": tokens,
        "tokens_per_s": tokens / seconds,
        # Engine-loop time per step (scheduling + launch + results), the same measure for pp = 1.
        "e2e_step_ms": 1e3 * seconds / max(steps, 1),
        "output_ids": [o["output_ids"] for o in outs],
    }


def _run_mode(
    engine: Any,
    mode: str,
    work,
    sampling,
    bounds,
    progress: Progress | None = None,
    label: str = "",
    graphs: bool = False,
) -> dict[str, Any]:
    from rollout_accel.serving.pipeline.latency import LatencyPredictor
    from rollout_accel.serving.pipeline.rebalance import Rebalancer

    runner = engine.runner

    def setup() -> None:
        runner.request_bounds(bounds)
        runner.finish_moves()  # each mode starts from its split
        runner.set_cuda_graphs(graphs)  # a no-op on engines without stage graphs (CPU)
        if graphs:
            runner.capture_graphs()  # every bucket before the clock starts (as after a start)
        runner.rebalance = mode.startswith("dynamic")
        runner.predictor = LatencyPredictor(runner.pp_size)  # every mode learns from scratch
        runner.rebalancer = Rebalancer(runner.model.config.num_hidden_layers, runner.pp_size)
        runner.timeline = runner.timeline[:0]
        runner.record_features = True

    engine.loop.call(setup)
    first = runner.steps
    graphs0 = _graph_counts(runner)
    outs, seconds, steps = _generate(engine, label or mode, work, sampling, progress)
    graphs1 = _graph_counts(runner)
    history = [h for h in runner.history if h["step"] > first]
    walls = np.array([h["wall"] for h in history])
    busy = np.array([h["busy"] for h in history])
    decode = [h for h in history if h["tokens"] == h["batch"]]
    half = walls[len(walls) // 2 :]
    return {
        "mode": mode,
        **_common(outs, seconds, steps),
        "micro_batches": runner.micro_batches,
        "initial_bounds": list(bounds),
        "final_bounds": list(runner.bounds),
        "moves": sum("layer" in t for t in runner.timeline),
        "mean_step_ms": 1e3 * float(walls.mean()),
        "p90_step_ms": 1e3 * float(np.percentile(walls, 90)),
        "second_half_step_ms": 1e3 * float(half.mean()),
        "mean_decode_step_ms": 1e3 * float(np.mean([h["wall"] for h in decode]))
        if decode
        else None,
        "mean_bottleneck_ms": 1e3 * float(busy.max(axis=1).mean()),
        "mean_busy_ms": [1e3 * float(b) for b in busy.mean(axis=0)],
        "bubble_per_stage": [
            float(1 - busy[:, i].sum() / walls.sum()) for i in range(busy.shape[1])
        ],
        "predictor": runner.predictor.report(),
        "timeline": [{**t, "step": t["step"] - first} for t in runner.timeline],
        "history": history,
        "cuda_graphs": graphs and runner.cuda_graphs,
        # Per stage, during this run: graphed micro-batches, captures, decode micro-batches run
        # eagerly for want of a graph (moves queued / in flight), graph drops.
        "graph_counts": [
            {k: b[k] - a[k] for k in b} for a, b in zip(graphs0, graphs1, strict=True)
        ],
        "graph_failures": [s.get("failed") for s in runner.graph_stats if s and s.get("failed")],
    }


def _graph_counts(runner: Any) -> list[dict[str, int]]:
    keys = ("replays", "captures", "eager_decode", "invalidations")
    return [{k: int(s[k]) if s else 0 for k in keys} for s in runner.graph_stats]


def _warm_up(engine: Any, work, sampling, greedy_sampling) -> None:
    """Every prompt, a few tokens, both sampling modes: the full batch's shapes (allocator,
    kernel compilation, cuBLAS heuristics) before anything is measured."""
    ids = [p for p, _ in work]
    for samp in (sampling, greedy_sampling):
        short = [{**s, "max_new_tokens": 4} for s in samp]
        engine.generate(input_ids=ids, sampling_params=short)
    engine.flush_cache()


def compare_tokens(reference: list[list[int]], other: list[list[int]]) -> dict[str, Any]:
    """How far `other` agrees with `reference`: identical sequences, and the share of tokens
    before each sequence's first difference (after one, the contexts differ and later tokens say
    nothing)."""
    prefixes = []
    for a, b in zip(reference, other, strict=True):
        diff = [i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y]
        prefixes.append(diff[0] if diff else min(len(a), len(b)))
    identical = sum(a == b for a, b in zip(reference, other, strict=True))
    return {
        "identical": identical == len(reference),
        "identical_seqs": identical,
        "seqs": len(reference),
        "prefix_token_share": sum(prefixes) / max(sum(len(a) for a in reference), 1),
        "first_divergence": min(
            (n for n, a, b in zip(prefixes, reference, other, strict=True) if a != b),
            default=None,
        ),
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
    reference: bool = False,
    best_static: bool = True,
    deadline_s: float | None = None,
    progress: Progress | None = None,
    cuda_graph: bool = False,
    **engine_args: Any,
) -> dict[str, Any]:
    """Runs the modes on one pp engine (see the module docstring); with `reference`, first the
    same requests on a pp = 1 engine (eager, like the stages) and a greedy pp run with one
    micro-batch (pp = 1's GEMM shapes). Optional runs (greedy dynamic, best static) are skipped
    once `deadline_s` has passed. Returns the results (tokens compared, not returned).

    `cuda_graph`: the stages' decode CUDA graphs (`pp_cuda_graph`). The pp = 1 reference then
    runs as the engine does by default (its decode CUDA graphs), and the pp runs are: top-p even
    eager, even with graphs, dynamic with graphs, even with graphs again (A-B-A); greedy even
    with graphs with 2 and 1 micro-batches; then (deadline) greedy dynamic and best static, with
    graphs. On the CPU the graphs are a no-op (the same runs, eager)."""
    import gc

    import torch

    from rollout_accel.serving.engine import Engine
    from rollout_accel.serving.pipeline.partition import even_bounds

    t_start = time.perf_counter()

    def say(message: str) -> None:
        if progress is not None:
            progress(message)

    def in_time(what: str) -> bool:
        if deadline_s is None or time.perf_counter() - t_start < deadline_s:
            return True
        say(f"skipping {what}: past the {deadline_s:.0f} s deadline")
        return False

    common = dict(max_running_requests=max(num_seqs, 8), seed=seed, **engine_args)
    ref: dict[str, Any] = {}
    if reference:
        say("pp=1 reference engine: building")
        t0 = time.perf_counter()
        engine = Engine(model, pp_size=1, cuda_graph=cuda_graph, **common)
        say(f"pp=1 engine built in {time.perf_counter() - t0:.1f} s")
        try:
            vocab = engine.model_config.vocab_size
            work = make_workload(num_seqs, max_len, seed, vocab)
            sampling = _sampling(work, 0.8, top_p)
            greedy_sampling = _sampling(work, 0.0, 1.0)
            _warm_up(engine, work, sampling, greedy_sampling)
            for kind, samp in (("top-p", sampling), ("greedy", greedy_sampling)):
                outs, seconds, steps = _generate(engine, f"pp=1 {kind}", work, samp, progress)
                ref[kind] = {"mode": "pp1", **_common(outs, seconds, steps)}
                say(f"pp=1 {kind}: {steps} steps, {ref[kind]['e2e_step_ms']:.2f} ms/step")
        finally:
            engine.shutdown()
            del engine
            gc.collect()  # the pp = 1 weights and KV go before the stages allocate theirs
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    say(f"pp={pp_size} engine: building")
    t0 = time.perf_counter()
    engine = Engine(
        model,
        pp_size=pp_size,
        pp_microbatches=micro_batches,
        pp_cuda_graph=cuda_graph,
        **common,
    )
    say(f"pp={pp_size} engine built in {time.perf_counter() - t0:.1f} s")
    try:
        runner = engine.runner
        layers = engine.model_config.num_hidden_layers
        vocab = engine.model_config.vocab_size
        work = make_workload(num_seqs, max_len, seed, vocab)
        sampling = _sampling(work, 0.8, top_p)
        greedy_sampling = _sampling(work, 0.0, 1.0)
        even = even_bounds(layers, pp_size)
        _warm_up(engine, work, sampling, greedy_sampling)
        say("pp warm-up done")

        def run(
            name: str, kind: str, bounds, mode: str | None = None, graphs: bool = False
        ) -> dict[str, Any]:
            samp = sampling if kind == "top-p" else greedy_sampling
            label = f"pp={pp_size} {kind} {name}"
            say(f"{label}: start (split {list(bounds)})")
            r = _run_mode(engine, mode or name, work, samp, bounds, progress, label, graphs)
            say(
                f"{label}: {r['steps']} steps, {r['e2e_step_ms']:.2f} ms/step, "
                f"split {r['initial_bounds']} -> {r['final_bounds']} ({r['moves']} moves)"
            )
            return r

        def one_micro_batch(name: str, mode: str, graphs: bool) -> dict[str, Any]:
            micro = runner.micro_batches
            engine.loop.call(lambda: setattr(runner, "micro_batches", 1))
            try:
                return run(name, "greedy", even, mode=mode, graphs=graphs)
            finally:
                engine.loop.call(lambda: setattr(runner, "micro_batches", micro))

        greedy: dict[str, Any] = {}
        if cuda_graph:
            g = True
            runs = {
                "even": run("even", "top-p", even),
                "even-graph": run("even-graph", "top-p", even, mode="even", graphs=g),
                "dynamic-graph": run("dynamic-graph", "top-p", even, graphs=g),
            }
            runs["even-graph-again"] = run("even-graph-again", "top-p", even, "even", g)
            if greedy_pass:
                greedy["even-graph"] = run("even-graph", "greedy", even, "even", g)
            if reference:
                greedy["even-graph-1mb"] = one_micro_batch("even-graph-1mb", "even", g)
            if greedy_pass and in_time("greedy dynamic"):
                greedy["dynamic-graph"] = run("dynamic-graph", "greedy", even, graphs=g)
            if best_static and in_time("best static"):
                static = best_static_bounds(runner, runs["even-graph"]["history"])
                runs["best-static-graph"] = run("best-static-graph", "top-p", static, "even", g)
        else:
            runs = {"even": run("even", "top-p", even), "dynamic": run("dynamic", "top-p", even)}
            # The even split once more after dynamic (A-B-A): the spread of the two even runs is
            # the run-to-run noise (and any drift) a difference must exceed to mean something.
            runs["even-again"] = run("even-again", "top-p", even, mode="even")
            if greedy_pass:
                greedy["even"] = run("even", "greedy", even)
            if reference:
                greedy["even-1mb"] = one_micro_batch("even-1mb", "even", False)
            if greedy_pass and in_time("greedy dynamic"):
                greedy["dynamic"] = run("dynamic", "greedy", even)
            if best_static and in_time("best static"):
                static = best_static_bounds(runner, runs["even"]["history"])
                runs["best-static"] = run("best-static", "top-p", static)
    finally:
        engine.shutdown()
    # Within the pp engine, runs on the same path (eager, or graphs with a settled split) share
    # GEMM shapes and kernels: their tokens must be identical. Across paths (graphs pad a
    # micro-batch to its bucket, so GEMMs see more rows) and for dynamic runs with graphs (they
    # run eagerly while layers move), bf16 near-ties may flip: those are reported, not enforced.
    token_check: dict[str, bool] = {}
    agreement: dict[str, Any] = {}
    for group, kind in ((runs, "top-p"), (greedy, "greedy")):
        for name, r in group.items():
            base = "even-graph" if name.endswith(("graph", "graph-again")) else "even"
            if name == base or base not in group or name.endswith("1mb"):
                continue
            same = r["output_ids"] == group[base]["output_ids"]
            if name.startswith("dynamic") and name.endswith("graph"):
                agreement[f"{kind} {name} vs {base}"] = compare_tokens(
                    group[base]["output_ids"], r["output_ids"]
                )
            elif kind == "top-p" or name.startswith("dynamic"):
                token_check[name if kind == "top-p" else f"greedy-{name}"] = same
        if "even-graph" in group and "even" in group:
            agreement[f"{kind} even-graph vs even (eager)"] = compare_tokens(
                group["even"]["output_ids"], group["even-graph"]["output_ids"]
            )
    # Against pp = 1: reported, not enforced (see `format_table` for when they may differ).
    vs_pp1 = {}
    for kind, pp1 in ref.items():
        group = runs if kind == "top-p" else greedy
        for mode, r in group.items():
            vs_pp1[f"{kind} {mode}"] = compare_tokens(pp1["output_ids"], r["output_ids"])
    for r in [*runs.values(), *greedy.values(), *ref.values()]:
        r.pop("output_ids")
        if "history" in r:
            r["history"] = [
                {k: v for k, v in h.items() if k != "micro_features"} for h in r["history"]
            ]
    even_busy = runs["even"]["mean_busy_ms"]
    graph_busy = runs["even-graph"]["mean_busy_ms"] if "even-graph" in runs else None
    return {
        "model": model,
        "pp_size": pp_size,
        "num_seqs": num_seqs,
        "max_len": max_len,
        "top_p": top_p,
        "micro_batches": micro_batches or pp_size,
        "modes": runs,
        "greedy": greedy,
        "reference_pp1": ref,
        # The imbalance the bench runs under: the last stage's busy time over the first's, even split.
        "even_split_busy_ratio_last_first": even_busy[-1] / max(even_busy[0], 1e-12),
        "tokens_identical": token_check,
        "graphs_vs_eager": agreement,
        "vs_pp1": vs_pp1,
        "cuda_graph": cuda_graph,
        "reference_cuda_graph": cuda_graph,
        "even_graph_busy_ratio_last_first": None
        if graph_busy is None
        else graph_busy[-1] / max(graph_busy[0], 1e-12),
    }


def format_table(result: dict[str, Any]) -> str:
    """One row per run: engine-loop ms per step and its ratio to the even split (the mean of the
    even runs of the same sampling) and to pp = 1; for pp runs the stage view: 'late ms' (mean
    launch wall over the second half of the steps, after the rebalancer's warm-up), the
    bottleneck, each stage's mean busy time, the split (initial -> final) and layer moves; then
    the token checks and the dynamic run's partition timeline."""
    pp = result["pp_size"]
    ref = result.get("reference_pp1", {})
    groups = {"top-p": result["modes"], "greedy": result["greedy"]}
    lines = [
        f"pipeline bench: {result['model']}, pp={pp} vs pp=1, {result['num_seqs']} seqs, "
        f"max_len {result['max_len']}, top-p {result['top_p']}, micro-batches "
        f"{result['micro_batches']}; even split: last stage busy "
        f"{result['even_split_busy_ratio_last_first']:.2f}x the first",
        f"{'sampling':8} {'run':24} {'ms/step':>8} {'vs even':>8} {'vs pp1':>7} {'late ms':>7} "
        f"{'bneck ms':>8} {'busy/stage ms':>14} {'tok/s':>8} {'split':>12} {'moves':>5}",
    ]
    if result.get("even_graph_busy_ratio_last_first") is not None:
        lines[0] += (
            f"; with graphs {result['even_graph_busy_ratio_last_first']:.2f}x (busy = GPU time)"
        )
    pp1 = "pp=1 (graphs)" if result.get("reference_cuda_graph") else "pp=1 (eager)"
    for kind, r in ref.items():
        lines.append(
            f"{kind:8} {pp1:24} {r['e2e_step_ms']:8.2f} {'':>8} {1.0:7.3f} {'':>7} "
            f"{'':>8} {'':>14} {r['tokens_per_s']:8.1f} {'':>12} {'':>5}"
        )
    for kind, runs in groups.items():
        evens = [r["e2e_step_ms"] for m, r in runs.items() if m in ("even", "even-again")]
        if not evens:  # greedy with graphs: relative to the even split with graphs
            evens = [r["e2e_step_ms"] for m, r in runs.items() if m.startswith("even-graph")]
        base = float(np.mean(evens)) if evens else float("nan")
        for mode, r in runs.items():
            ms = r["e2e_step_ms"]
            vs1 = f"{ms / ref[kind]['e2e_step_ms']:7.3f}" if kind in ref else f"{'':>7}"
            busy = "/".join(f"{b:.2f}" for b in r["mean_busy_ms"])
            split = f"{_counts(r['initial_bounds'])}->{_counts(r['final_bounds'])}"
            lines.append(
                f"{kind:8} {f'pp={pp} {mode}':24} {ms:8.2f} {ms / base:8.3f} {vs1} "
                f"{r['second_half_step_ms']:7.2f} {r['mean_bottleneck_ms']:8.2f} {busy:>14} "
                f"{r['tokens_per_s']:8.1f} {split:>12} {r['moves']:5d}"
            )
    bad = [name for name, same in result["tokens_identical"].items() if not same]
    lines.append(
        f"tokens identical across pp={pp} modes: "
        + ("yes" if not bad else f"NO ({', '.join(bad)} differ from even: a bug)")
    )
    if result.get("vs_pp1"):
        parts = [
            f"{name} {c['identical_seqs']}/{c['seqs']} ({c['prefix_token_share']:.3f})"
            for name, c in result["vs_pp1"].items()
        ]
        lines.append(
            "vs pp=1, seqs identical (share of tokens before a first difference): "
            + ", ".join(parts)
        )
        lines.append(
            "  (greedy even-1mb / even-graph-1mb have pp=1's GEMM shapes: expected identical; with more micro-batches"
            " each GEMM has fewer rows and a bf16 near-tie may flip a token)"
        )
    for name, c in result.get("graphs_vs_eager", {}).items():
        lines.append(
            f"{name}: seqs identical {c['identical_seqs']}/{c['seqs']} "
            f"(share before a first difference {c['prefix_token_share']:.3f}; reported only)"
        )
    for kind, runs in groups.items():
        for mode, r in runs.items():
            if r.get("cuda_graphs"):
                counts = " | ".join(
                    f"s{i} replays {c['replays']} eager {c['eager_decode']} "
                    f"captures {c['captures']} drops {c['invalidations']}"
                    for i, c in enumerate(r["graph_counts"])
                )
                lines.append(f"graphs {kind} {mode}: {counts}")
            for failure in r.get("graph_failures", []):
                lines.append(f"graphs {kind} {mode}: CAPTURE FAILED, eager: {failure[:200]}")
    dynamic = "dynamic-graph" if "dynamic-graph" in result["modes"] else "dynamic"
    timeline = result["modes"][dynamic]["timeline"]
    lines.append(
        f"{dynamic} timeline (top-p): "
        + (", ".join(f"step {t['step']}: {t['bounds']}" for t in timeline) or "no moves")
    )
    return "\n".join(lines)


def _counts(bounds: list[int]) -> str:
    return "+".join(str(b - a) for a, b in itertools.pairwise(bounds))


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
    parser.add_argument("--reference", action="store_true", help="also run pp = 1 first")
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="stage decode CUDA graphs (pp_cuda_graph): eager vs graphs runs (GPU; CPU: eager)",
    )
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
        reference=args.reference,
        cuda_graph=args.cuda_graph,
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
