"""`rollout bench --scenario slo`: schedule policies under bursty multi-turn agent traffic.

One engine, one seeded traffic (`agent_traffic.py`), the policies fcfs, lpm, hrrn and slo in turn
(the policy is swapped between runs and the prefix cache flushed, so each run starts cold).
Calibration first: the engine's prefill rate is measured on fresh prompts; the burst rate is set
so the traffic's prefill work is `--load` of that rate, and the TTFT SLO is `--slo-x` times the
time to prefill the longest fresh prompt on the idle engine (or `--ttft-slo-ms`). Every request
carries that SLO. Reported per policy: TTFT p50 / p99, SLO attainment (share of requests whose
TTFT is within the SLO), max wait (TTFT), output and request throughput over the run, the longest
engine step seen (largest gap between two tokens of a stream), and the starvation check: requests
overtaken (a later arrival got its first token first) after their deadline + one step.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from rollout_accel.rollout.bench.agent_traffic import (
    AgentTraffic,
    AgentTrafficConfig,
    make_agent_traffic,
)

POLICIES = ("fcfs", "lpm", "hrrn", "slo")


@dataclasses.dataclass(slots=True)
class RequestRecord:
    kind: str  # "turn" or "fresh"
    arrival: float
    first_token: float
    finish: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    max_gap: float
    slo_s: float
    output_ids: list[int]

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival


async def _submit(
    engine: Any, ids: list[int], max_new: int, kind: str, slo_s: float, stream: bool
) -> RequestRecord:
    """One request through the engine's submit/sink API. Arrival, first-token and finish times
    are the engine's own (`Request`, perf_counter). Streamed requests (a sample: per-token
    outputs cost CPU) also time each token's hand-over, whose largest gap is one engine step."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()
    times: list[float] = []

    def sink(out: dict[str, Any], finished: bool) -> None:
        times.append(time.perf_counter())
        if finished:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(out))

    reqs, _ = engine.make_requests(
        input_ids=ids,
        sampling_params={"max_new_tokens": max_new, "ignore_eos": True, "temperature": 0.0},
        stream=stream,
        ttft_slo_ms=slo_s * 1000.0,
    )
    req = reqs[0]
    engine.submit(reqs, [sink], wait=False)
    out = await done
    meta = out["meta_info"]
    gaps = np.diff(times) if len(times) > 1 else np.zeros(1)
    return RequestRecord(
        kind,
        req.arrival_time,
        req.first_token_time,
        req.finish_time,
        meta["prompt_tokens"],
        meta["cached_tokens"],
        meta["completion_tokens"],
        float(gaps.max()),
        slo_s,
        out["output_ids"],
    )


async def drive(engine: Any, traffic: AgentTraffic, slo_s: float) -> list[RequestRecord]:
    """Plays the traffic against the engine in real time; returns one record per request."""
    records: list[RequestRecord] = []
    t0 = time.perf_counter() + 0.05
    counter = iter(range(1 << 30))

    def streamed() -> bool:
        return next(counter) % 8 == 0

    async def until(offset: float) -> None:
        delay = t0 + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)

    async def session(s) -> None:
        await until(s.start_s)
        context = list(s.prompt)
        for turn in s.turns:
            rec = await _submit(engine, context, turn.max_new_tokens, "turn", slo_s, streamed())
            records.append(rec)
            context = context + rec.output_ids + turn.tool_tokens
            if turn.think_s > 0:
                await asyncio.sleep(turn.think_s)

    async def fresh(f) -> None:
        await until(f.arrival_s)
        records.append(
            await _submit(engine, f.prompt, f.max_new_tokens, "fresh", slo_s, streamed())
        )

    await asyncio.gather(
        *(session(s) for s in traffic.sessions), *(fresh(f) for f in traffic.fresh)
    )
    return records


def overtaken_late(records: list[RequestRecord], step_s: float) -> int:
    """Requests that a later arrival passed (got its first token first) after this request's
    deadline + one step: starvation caused by reordering. Zero is the bound."""
    count = 0
    for r in records:
        limit = r.arrival + r.slo_s + step_s
        if r.first_token <= limit:
            continue
        if any(q.arrival > r.arrival and limit < q.first_token < r.first_token for q in records):
            count += 1
    return count


def summarize(policy: str, runs: list[list[RequestRecord]]) -> dict[str, Any]:
    """One row over a policy's runs (one run per traffic round; throughput over their summed
    makespans, the starvation check within each run)."""
    records = [r for run in runs for r in run]
    ttft = np.array([r.ttft for r in records])
    makespan = sum(max(r.finish for r in run) - min(r.arrival for r in run) for run in runs)
    step_s = max(r.max_gap for r in records)
    by_kind = {kind: [r.ttft for r in records if r.kind == kind] for kind in ("turn", "fresh")}
    return {
        "policy": policy,
        "requests": len(records),
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "ttft_mean_s": float(ttft.mean()),
        "attainment": float(np.mean([r.ttft <= r.slo_s for r in records])),
        "max_wait_s": float(ttft.max()),
        "turn_ttft_p99_s": float(np.percentile(by_kind["turn"], 99)) if by_kind["turn"] else 0.0,
        "fresh_ttft_p99_s": float(np.percentile(by_kind["fresh"], 99)) if by_kind["fresh"] else 0.0,
        "output_tok_s": sum(r.completion_tokens for r in records) / makespan,
        "req_s": len(records) / makespan,
        "makespan_s": makespan,
        "cache_hit": sum(r.cached_tokens for r in records)
        / max(1, sum(r.prompt_tokens for r in records)),
        "step_max_s": step_s,
        "late_max_s": float(max(0.0, max(r.ttft - r.slo_s for r in records))),
        "overtaken_late": sum(overtaken_late(run, step_s) for run in runs),
    }


def _calibrate(engine: Any, cfg: AgentTrafficConfig, vocab: int) -> tuple[float, float]:
    """(prefill tokens/s on fresh prompts of the traffic's mean fresh length, four at a time;
    decode tokens/s of 32 short sequences), each the best of three rounds (other load on the
    machine only slows a round)."""
    rng = np.random.default_rng(cfg.seed + 1)
    length = int(cfg.scale * sum(cfg.fresh_len) / 2)
    prefill = decode = 0.0
    for _ in range(3):
        prompts = [rng.integers(4, vocab, size=length).tolist() for _ in range(4)]
        start = time.perf_counter()
        engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": 1})
        prefill = max(prefill, 4 * length / (time.perf_counter() - start))
        prompts = [rng.integers(4, vocab, size=16).tolist() for _ in range(32)]
        start = time.perf_counter()
        engine.generate(
            input_ids=prompts, sampling_params={"max_new_tokens": 33, "ignore_eos": True}
        )
        decode = max(decode, 32 * 32 / (time.perf_counter() - start))
    engine.flush_cache()
    return prefill, decode


def _set_policy(engine: Any, name: str, slo_ms: float, window: int) -> None:
    from rollout_accel.serving.engine.schedule_policy import make_policy

    config = dataclasses.replace(
        engine.config, schedule_policy=name, ttft_slo_ms=slo_ms, schedule_window=window
    )
    policy = make_policy(name, config)

    def swap() -> None:
        engine.scheduler.policy = policy

    engine.run_on_engine_thread(swap)
    if not engine.flush_cache():
        raise RuntimeError("flush_cache refused: requests still hold KV between policy runs")


def table_text(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'policy':7s} {'reqs':>5s} {'TTFT p50':>9s} {'TTFT p99':>9s} {'attain':>7s} "
        f"{'max wait':>9s} {'out tok/s':>9s} {'req/s':>6s} {'hit':>5s} {'step max':>9s} "
        f"{'overtaken late':>14s}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['policy']:7s} {r['requests']:5d} {r['ttft_p50_s']:9.3f} {r['ttft_p99_s']:9.3f} "
            f"{r['attainment']:7.3f} {r['max_wait_s']:9.3f} {r['output_tok_s']:9.1f} "
            f"{r['req_s']:6.2f} {r['cache_hit']:5.2f} {r['step_max_s']:9.3f} "
            f"{r['overtaken_late']:14d}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rollout bench --scenario slo", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset")
    p.add_argument("--model-path", default="tiny-qwen3", help="preset or HF-layout directory")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--load",
        type=float,
        default=0.8,
        help="offered engine time per second: prefill and decode work at the calibrated rates",
    )
    p.add_argument(
        "--burst-rate",
        type=float,
        default=None,
        help="bursts per second (overrides --load; for machines whose speed drifts)",
    )
    p.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per run")
    p.add_argument(
        "--slo-x",
        type=float,
        default=3.0,
        help="SLO = x * idle prefill of the longest fresh prompt",
    )
    p.add_argument(
        "--ttft-slo-ms", type=float, default=None, help="absolute SLO (overrides --slo-x)"
    )
    p.add_argument("--scale", type=float, default=0.5, help="multiply prompt lengths (GPU: 2)")
    p.add_argument(
        "--max-prefill-tokens", type=int, default=2048, help="engine prefill budget per step"
    )
    p.add_argument("--max-running-requests", type=int, default=128)
    p.add_argument("--window", type=int, default=32, help="slo policy window")
    p.add_argument("--rounds", type=int, default=2, help="traffic seeds, each run by every policy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"), help="results directory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    bad = [p for p in policies if p not in POLICIES]
    if bad or not policies:
        raise SystemExit(f"rollout bench: error: --policies: {bad or '(empty)'} not in {POLICIES}")
    from rollout_accel.serving.engine import Engine

    base = AgentTrafficConfig(duration_s=args.duration, scale=args.scale, seed=args.seed)
    context = (
        int(
            args.scale
            * max(
                base.fresh_len[1],
                base.system_len
                + base.task_len[1]
                + base.turns[1] * (base.tool_len[1] + base.answer_len[1]),
            )
        )
        + 256
    )
    engine = Engine(
        args.model_path,
        device=args.device,
        max_prefill_tokens=args.max_prefill_tokens,
        max_running_requests=args.max_running_requests,
        context_length=context,
    )
    traffics: list[AgentTraffic] = []
    try:
        vocab = min(engine.model_config.vocab_size, 32000)
        # Rounds rotate the policy order so drifting load on a shared machine hits all alike;
        # within a round every policy replays the same traffic. Each round recalibrates: its
        # burst rate (and, unless --ttft-slo-ms, its SLO) follow the machine's speed right then.
        runs: dict[str, list[list[RequestRecord]]] = {name: [] for name in policies}
        calibrations: list[dict[str, Any]] = []
        for k in range(args.rounds):
            rate, decode_rate = _calibrate(engine, base, vocab)
            longest_s = args.scale * base.fresh_len[1] / rate
            slo_ms = args.ttft_slo_ms or args.slo_x * longest_s * 1000.0
            burst_s = (
                base.mean_prefill_tokens_per_burst() / rate
                + base.mean_decode_tokens_per_burst() / decode_rate
            )
            burst_rate = args.burst_rate or args.load / burst_s
            traffic = make_agent_traffic(
                dataclasses.replace(base, burst_rate=burst_rate, seed=args.seed + k), vocab
            )
            traffics.append(traffic)
            calibrations.append(
                {
                    "prefill_tok_s": rate,
                    "decode_tok_s": decode_rate,
                    "ttft_slo_ms": slo_ms,
                    "burst_rate": burst_rate,
                    "requests": traffic.describe()["turns"] + len(traffic.fresh),
                }
            )
            print(
                f"round {k}: prefill {rate:.0f} tok/s, decode {decode_rate:.0f} tok/s, "
                f"TTFT SLO {slo_ms:.0f} ms, {burst_rate:.3f} bursts/s, "
                f"{calibrations[-1]['requests']} requests",
                flush=True,
            )
            for i in range(len(policies)):
                name = policies[(i + k) % len(policies)]
                _set_policy(engine, name, slo_ms, args.window)
                started = time.perf_counter()
                runs[name].append(asyncio.run(drive(engine, traffic, slo_ms / 1000.0)))
                row = summarize(name, runs[name][-1:])
                print(
                    f"round {k} {name}: {time.perf_counter() - started:.1f}s, TTFT p99 "
                    f"{row['ttft_p99_s']:.3f}s, attainment {row['attainment']:.3f}",
                    flush=True,
                )
        rows = [summarize(name, runs[name]) for name in policies]
    finally:
        engine.shutdown()
    ref = {r["policy"]: r for r in rows}
    if "slo" in ref:
        for other in ("fcfs", "lpm"):
            if other in ref:
                ref["slo"][f"p99_vs_{other}"] = ref["slo"]["ttft_p99_s"] / ref[other]["ttft_p99_s"]
                ref["slo"][f"throughput_vs_{other}"] = (
                    ref["slo"]["output_tok_s"] / ref[other]["output_tok_s"]
                )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "scenario": "slo",
        "settings": vars(args),
        "rounds": calibrations,
        "workload": [t.describe() for t in traffics],
        "device": str(engine.device),
        "summary": rows,
    }
    (out / "slo_results.json").write_text(json.dumps(payload, indent=2))
    text = table_text(rows)
    (out / "slo_table.txt").write_text(text + "\n")
    slos = ", ".join(f"{c['ttft_slo_ms']:.0f}" for c in calibrations)
    print(
        f"rollout bench --scenario slo: {args.model_path} on {engine.device}, SLO ms per round: {slos}"
    )
    print(text)
    for other in ("fcfs", "lpm"):
        key = f"p99_vs_{other}"
        if "slo" in ref and key in ref["slo"]:
            print(
                f"slo vs {other}: p99 TTFT {ref['slo'][key]:.2f}x, "
                f"output throughput {ref['slo'][f'throughput_vs_{other}']:.2f}x"
            )
    print(f"results: {out / 'slo_results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
