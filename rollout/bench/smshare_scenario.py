"""`rollout bench --scenario smshare`: prefill/decode SM sharing vs time-sharing, in one process.

One engine (SM sharing built in, GPU with green contexts) serves the same seeded rollout-shaped
workload four ways, switching only the runner's mode between runs:
  eager       a mixed step (decode rows + a prefill chunk) as one eager forward: the engine
              before prefill-chunk graphs, and with --prefill-cuda-graph-max-tokens 0;
  sequential  the engine's default time-sharing now: the decode graph, then the prefill-chunk
              graph, on the whole GPU (the baseline that isolates what concurrency buys);
  static      SM-shared, one fixed preset whenever both sides have work (the preset the latency
              model predicts fastest over the adaptive run's mixed steps; `--static-preset all`
              measures every preset instead and keeps the best);
  adaptive    SM-shared, the planner's choice per step (the whole GPU among the options).
Workload: a large running decode batch (long outputs) plus continuous arrivals of long prompts,
resumed partial samples (a running sample's prompt + a partial response, so the prefix is cached)
and multi-turn appends (an earlier prompt + a new turn). The mix shifts: arrivals are dense in
the first phase (prefill-heavy) and sparse in the second (decode-heavy).
Reports output throughput, TTFT and TPOT p50/p99 per mode, ratios against eager and against
sequential, each mode's mixed steps (count, mean time, share of the run), the split counts,
and a preset timeline (PNG). Exits with status 2 and a message where green
contexts are missing.

    rollout bench --scenario smshare [--model qwen3-0.6b-shape] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Arrival:
    offset_s: float
    kind: str
    input_ids: list[int]
    max_new_tokens: int


@dataclass
class Workload:
    background: list[list[int]]
    background_new: int
    arrivals: list[Arrival]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rollout bench --scenario smshare", description=__doc__)
    p.add_argument("--model", default="qwen3-0.6b-shape")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--background", type=int, default=160, help="running decode requests")
    p.add_argument("--background-prompt", type=int, default=2048)
    p.add_argument("--background-new", type=int, default=768, help="their output tokens")
    p.add_argument("--arrivals", type=int, default=72)
    p.add_argument("--dense-rate", type=float, default=24.0, help="arrivals/s, first phase")
    p.add_argument("--sparse-rate", type=float, default=4.0, help="arrivals/s, second phase")
    p.add_argument("--long-prompt", type=int, nargs=2, default=(2048, 4096), metavar=("MIN", "MAX"))
    p.add_argument("--arrival-new", type=int, default=96, help="output tokens per arrival")
    p.add_argument("--max-prefill-tokens", type=int, default=4096)
    p.add_argument("--context-length", type=int, default=8192)
    p.add_argument("--tpot-ms", type=float, default=50.0)
    p.add_argument("--static-preset", default="model", help="model | all | a preset name (104/28)")
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    return p


def make_workload(args: argparse.Namespace, vocab: int) -> Workload:
    """Seeded; token ids drawn from [10, min(vocab, 30000))."""
    rng = np.random.default_rng(args.seed)
    top = min(vocab, 30_000)

    def ids(n: int) -> list[int]:
        return rng.integers(10, top, size=int(n)).tolist()

    background = [ids(args.background_prompt) for _ in range(args.background)]
    arrivals: list[Arrival] = []
    t = 0.0
    dense = args.arrivals * 2 // 3
    earlier: list[list[int]] = []
    lo, hi = args.long_prompt
    for i in range(args.arrivals):
        t += float(rng.exponential(1.0 / (args.dense_rate if i < dense else args.sparse_rate)))
        kind = ("long", "resumed", "multiturn")[int(rng.integers(0, 3))]
        if kind == "resumed":  # a running sample's prompt + a partial response
            base = background[int(rng.integers(0, len(background)))]
            prompt = base + ids(rng.integers(lo // 2, hi // 2))
        elif kind == "multiturn" and earlier:  # an earlier conversation + a new turn
            prompt = earlier[int(rng.integers(0, len(earlier)))] + ids(rng.integers(128, 512))
        else:
            kind = "long"
            prompt = ids(rng.integers(lo, hi))
        prompt = prompt[: args.context_length - args.arrival_new - 8]
        earlier.append(prompt)
        arrivals.append(Arrival(t, kind, prompt, args.arrival_new))
    return Workload(background, args.background_new, arrivals)


def run_once(engine: Any, workload: Workload) -> dict[str, Any]:
    """Serves the workload; returns throughput, TTFT/TPOT percentiles (seconds) and counts."""
    requests: list[tuple[str, Any]] = []
    done = threading.Semaphore(0)

    def sink(out: dict[str, Any], finished: bool) -> None:
        if finished:
            if "error" in out:
                print(f"request failed: {out['error']}", file=sys.stderr)
            done.release()

    def submit(ids: list[int], new: int, kind: str) -> None:
        params = {"temperature": 0, "max_new_tokens": new, "ignore_eos": True}
        reqs, _ = engine.make_requests(input_ids=ids, sampling_params=params)
        requests.extend((kind, r) for r in reqs)
        engine.submit(reqs, [sink] * len(reqs), wait=False)

    start = time.perf_counter()
    for ids in workload.background:
        submit(ids, workload.background_new, "background")
    for arrival in workload.arrivals:
        delay = start + arrival.offset_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        submit(arrival.input_ids, arrival.max_new_tokens, arrival.kind)
    for _ in requests:
        done.acquire()
    end = max(r.finish_time or time.perf_counter() for _, r in requests)
    tokens = sum(len(r.output_ids) for _, r in requests)
    ttft = [
        r.first_token_time - r.arrival_time
        for kind, r in requests
        if kind != "background" and r.first_token_time is not None
    ]
    tpot = [
        (r.finish_time - r.first_token_time) / (len(r.output_ids) - 1)
        for _, r in requests
        if r.first_token_time is not None and r.finish_time and len(r.output_ids) > 1
    ]

    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(values, q)) if values else float("nan")

    return {
        "wall_s": end - start,
        "output_tokens": tokens,
        "throughput_tok_s": tokens / (end - start),
        "ttft_p50_ms": pct(ttft, 50) * 1e3,
        "ttft_p99_ms": pct(ttft, 99) * 1e3,
        "tpot_p50_ms": pct(tpot, 50) * 1e3,
        "tpot_p99_ms": pct(tpot, 99) * 1e3,
        "requests": len(requests),
    }


def _model_static_choice(runner: Any, steps: list[Any]) -> int:
    """The preset with the least predicted time summed over the given mixed steps."""
    model = runner.planner.model
    mixed = [s for s in steps if s.decode_rows and s.prefill_tokens]
    if not mixed:
        return model.presets[len(model.presets) // 2]
    return min(
        model.presets,
        key=lambda p: sum(
            model.concurrent(p, s.decode_rows, s.context_tokens, s.prefill_tokens) for s in mixed
        ),
    )


def _plot(timelines: dict[str, list[Any]], names: list[str], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG"
    order = {name: i for i, name in enumerate(names)}
    fig, axes = plt.subplots(len(timelines), 1, figsize=(10, 2.2 * len(timelines)), squeeze=False)
    for ax, (label, steps) in zip(axes[:, 0], timelines.items(), strict=True):
        if steps:
            t0 = steps[0].time
            times = [s.time - t0 for s in steps]
            ax.scatter(times, [order.get(s.preset, -1) for s in steps], s=4)
            # The mix behind each choice: prefill tokens in the step (right axis).
            mix = ax.twinx()
            mix.plot(times, [s.prefill_tokens for s in steps], color="0.6", lw=0.6, alpha=0.6)
            mix.set_ylabel("prefill tokens", color="0.4")
        ax.set_yticks(range(len(names)), names)
        ax.set_title(f"{label}: split per mixed step (prefill/decode SMs)")
        ax.set_xlabel("seconds since the run started")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from rollout_accel.serving.smshare.partitions import unsupported_reason

    why = unsupported_reason(torch.device("cuda")) if torch.cuda.is_available() else "no GPU"
    if why is not None:
        print(
            f"smshare bench: green contexts are unavailable here ({why}). It needs an NVIDIA GPU "
            "with compute capability >= 9.0, a CUDA driver >= 12.4 and cuda-bindings.",
            file=sys.stderr,
        )
        return 2
    from rollout_accel.serving.engine import Engine

    engine = Engine(
        args.model,
        dtype=args.dtype,
        device="cuda",
        seed=args.seed,
        max_running_requests=args.background + args.arrivals + 8,
        max_prefill_tokens=args.max_prefill_tokens,
        context_length=args.context_length,
        sm_share=True,
        sm_share_tpot_ms=args.tpot_ms,
    )
    try:
        return _run_all(engine, args)
    finally:
        engine.shutdown()


def _run_all(engine: Any, args: argparse.Namespace) -> int:
    import torch

    from rollout_accel.serving.smshare.planner import WHOLE_NAME

    runner = engine.runner
    if not runner.available:
        print(
            f"smshare bench: SM sharing unavailable ({runner.unavailable_reason})", file=sys.stderr
        )
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    workload = make_workload(args, engine.model_config.vocab_size)
    names = [WHOLE_NAME, *runner.partitions.describe()]

    def serve(
        mode: str, preset: int | None = None, load: Workload = workload
    ) -> tuple[dict[str, Any], list[Any]]:
        engine.flush_cache()
        engine.loop.call(lambda: runner.set_mode(mode, preset))
        runner.timeline.clear()
        result = run_once(engine, load)
        engine.loop.call(lambda: (torch.cuda.synchronize(), runner._poll_timings()))
        result["preset_counts"] = runner.metrics() if mode != "eager" else {}
        steps = list(runner.timeline)
        timed = [s for s in steps if s.measured_s > 0 and s.predicted_s > 0]
        result["mixed_steps_planned"] = len(steps)
        if timed:  # how much of the run the mixed steps (the only ones a split changes) took
            mixed_s = sum(s.measured_s for s in timed)
            result["mixed_step_ms_mean"] = 1e3 * mixed_s / len(timed)
            result["mixed_share_of_wall"] = mixed_s / result["wall_s"]
        if timed:
            ratios = [s.measured_s / s.predicted_s for s in timed]
            result["measured_over_predicted_p50"] = float(np.median(ratios))
        return result, steps

    # Warm-up on a slice of the workload: Triton autotuning and allocator growth stay out of
    # the measured runs.
    warm = Workload(workload.background[:32], 32, workload.arrivals[:8])
    for mode in ("eager", "sequential"):  # both paths compile and autotune before measuring
        serve(mode, load=warm)
    results: dict[str, dict[str, Any]] = {}
    timelines: dict[str, list[Any]] = {}
    results["eager"], _ = serve("eager")
    results["sequential"], _ = serve("sequential")
    results["adaptive"], timelines["adaptive"] = serve("adaptive")
    if args.static_preset == "all":
        best: tuple[float, str] | None = None
        for preset in runner.partitions.presets:
            res, steps = serve("static", preset.index)
            results[f"static {preset.name}"] = res
            timelines[f"static {preset.name}"] = steps
            if best is None or res["throughput_tok_s"] > best[0]:
                best = (res["throughput_tok_s"], f"static {preset.name}")
        assert best is not None
        results["static"] = dict(results[best[1]], preset=best[1].split()[1])
    else:
        if args.static_preset == "model":
            index = _model_static_choice(runner, timelines["adaptive"])
        else:
            by_name = {p.name: p.index for p in runner.partitions.presets}
            if args.static_preset not in by_name:
                print(f"--static-preset {args.static_preset}: not one of {sorted(by_name)}")
                return 2
            index = by_name[args.static_preset]
        results["static"], timelines["static"] = serve("static", index)
        results["static"]["preset"] = runner.partitions.presets[index].name
    engine.loop.call(lambda: runner.set_mode("time-share"))
    eager = results["eager"]
    sequential = results["sequential"]
    for res in results.values():
        res["throughput_vs_eager"] = res["throughput_tok_s"] / eager["throughput_tok_s"]
        res["throughput_vs_sequential"] = res["throughput_tok_s"] / sequential["throughput_tok_s"]
    problem = _plot(timelines, names, out_dir / "smshare_timeline.png")
    report = {
        "scenario": "smshare",
        "device": torch_device_name(),
        "model": args.model,
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "presets": names[1:],
        "total_sms": runner.partitions.total_sms,
        "latency_table": runner.latency_table.to_dict(),
        "results": results,
        "timelines": {
            label: [
                [
                    round(s.time - steps[0].time, 4),
                    s.preset,
                    s.decode_rows,
                    s.prefill_tokens,
                    round(s.predicted_s * 1e3, 3),
                    round(s.measured_s * 1e3, 3),
                ]
                for s in steps[:20_000]
            ]
            for label, steps in timelines.items()
        },
        "timeline_columns": [
            "t_s",
            "preset",
            "decode_rows",
            "prefill_tokens",
            "pred_ms",
            "meas_ms",
        ],
        "timeline_png": None if problem else str(out_dir / "smshare_timeline.png"),
    }
    (out_dir / "smshare_bench.json").write_text(json.dumps(report, indent=2, default=str))
    print(format_table(results))
    if problem:
        print(problem)
    print(f"wrote {out_dir / 'smshare_bench.json'}")
    return 0


def torch_device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def format_table(results: dict[str, dict[str, Any]]) -> str:
    head = (
        f"{'mode':<18}{'tok/s':>9}{'x eager':>8}{'x seq':>7}"
        f"{'TTFT p50':>10}{'p99':>8}{'TPOT p50':>10}{'p99':>8}"
    )
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        lines.append(
            f"{name:<18}{r['throughput_tok_s']:>9.0f}{r['throughput_vs_eager']:>8.2f}"
            f"{r.get('throughput_vs_sequential', float('nan')):>7.2f}"
            f"{r['ttft_p50_ms']:>10.1f}{r['ttft_p99_ms']:>8.1f}"
            f"{r['tpot_p50_ms']:>10.2f}{r['tpot_p99_ms']:>8.2f}"
        )
    lines.append("(ms; 'x eager', 'x seq' = throughput / eager, / sequential)")
    for name, r in results.items():
        if "mixed_step_ms_mean" in r:
            counts = {
                k.split("/")[-1]: int(v)
                for k, v in r.get("preset_counts", {}).items()
                if k.startswith("sm_share/steps/")
            }
            lines.append(
                f"{name}: {r['mixed_steps_planned']} mixed steps, mean "
                f"{r['mixed_step_ms_mean']:.2f} ms, {100 * r['mixed_share_of_wall']:.0f}% of the "
                f"run; splits {counts}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
