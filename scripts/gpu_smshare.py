"""SM sharing on one GPU (issue 14), in one go (under 4 minutes on an H200):

    python scripts/gpu_smshare.py [--scenario]

  (a) partitions are disjoint: a Triton kernel reads %smid on each partition's stream (alone and
      both at once); also a graph captured on the decode stream vs one captured elsewhere and
      replayed there (does a foreign graph keep to the partition?); then prefill/decode proxy
      GEMMs at once on each preset vs one after the other on the whole GPU;
  (b) 1,000 preset switches (and 20 create/close cycles) leak no memory, contexts or streams;
  (c) the concurrent runner: tiny-qwen3 fp32 outputs (greedy and seeded temperature 1) with SM
      sharing (every preset, adaptive) == the plain runner's; then a mixed prefill + decode
      workload at qwen3-0.6b-shape bf16, eager and sequential vs SM-shared (adaptive, two
      static presets): output tokens/s and the ratio, per-step timeline in smshare_timeline.json;
  (d) with --scenario: `rollout bench --scenario smshare` as well (minutes more).
Each part is bounded (SIGALRM; part c in child processes, so an abort costs only that part) and
the others still run. Prints a table last; writes JSON to $OUT (default ./out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from repo_path import expose_repo


# -- (a) %smid ------------------------------------------------------------------------------------
def _smid_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def smid(out_ptr, spin, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        acc = offs.to(tl.float32)
        for _ in range(spin):  # keep blocks resident a while so they spread over every SM
            acc = acc * 1.0001 + 0.5
        sm = tl.inline_asm_elementwise(
            "mov.u32 $0, %smid;", "=r,r", [offs], dtype=tl.int32, is_pure=False, pack=1
        )
        tl.store(out_ptr + offs, sm + (acc < -1.0).to(tl.int32))  # acc is never < -1

    return smid


def _sm_set(torch, kernel, stream, programs: int = 4096, spin: int = 2000) -> set[int]:
    out = torch.full((programs * 128,), -1, dtype=torch.int32, device="cuda")
    with torch.cuda.stream(stream):
        kernel[(programs,)](out, spin, BLOCK=128)
    torch.cuda.synchronize()
    return set(out.unique().tolist()) - {-1}


def part_a(torch) -> dict[str, Any]:
    from rollout_accel.serving.smshare.partitions import PartitionSet

    kernel = _smid_kernel()
    total = torch.cuda.get_device_properties(0).multi_processor_count
    whole = _sm_set(torch, kernel, torch.cuda.current_stream())
    ps = PartitionSet.create(torch.device("cuda", 0))
    rows = []
    try:
        for preset in ps.presets:
            pre = _sm_set(torch, kernel, preset.prefill.stream)
            dec = _sm_set(torch, kernel, preset.decode.stream)
            # Both at once: launch on the two streams before waiting for either.
            outs = []
            for part in (preset.prefill, preset.decode):
                out = torch.full((4096 * 128,), -1, dtype=torch.int32, device="cuda")
                part.stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(part.stream):
                    kernel[(4096,)](out, 2000, BLOCK=128)
                outs.append(out)
            torch.cuda.synchronize()
            pre2, dec2 = (set(o.unique().tolist()) - {-1} for o in outs)
            rows.append(
                {
                    "preset": preset.name,
                    "prefill_sms_seen": len(pre),
                    "decode_sms_seen": len(dec),
                    "overlap": len(pre & dec),
                    "overlap_concurrent": len(pre2 & dec2),
                    "prefill_within_quota": len(pre) <= preset.prefill.sms,
                    "decode_within_quota": len(dec) <= preset.decode.sms,
                    "disjoint": not (pre & dec) and not (pre2 & dec2),
                }
            )
        graph_rows = _graph_confinement(torch, kernel, ps.presets[len(ps.presets) // 2])
    finally:
        ps.close()
    return {
        "total_sms": total,
        "whole_gpu_sms_seen": len(whole),
        "presets": rows,
        "graphs": graph_rows,
        "ok": all(
            r["disjoint"] and r["prefill_within_quota"] and r["decode_within_quota"] for r in rows
        ),
    }


def _graph_confinement(torch, kernel, preset) -> dict[str, Any]:
    out = torch.full((4096 * 128,), -1, dtype=torch.int32, device="cuda")
    kernel[(4096,)](out, 2000, BLOCK=128)  # compile outside capture
    torch.cuda.synchronize()
    result: dict[str, Any] = {"preset": preset.name, "decode_sms": preset.decode.sms}
    for label, capture_stream in (
        ("captured_on_decode_stream", preset.decode.stream),
        ("captured_on_plain_stream", torch.cuda.Stream()),
    ):
        graph = torch.cuda.CUDAGraph()
        capture_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.graph(graph, stream=capture_stream):
            kernel[(4096,)](out, 2000, BLOCK=128)
        out.fill_(-1)
        torch.cuda.synchronize()
        with torch.cuda.stream(preset.decode.stream):
            graph.replay()
        torch.cuda.synchronize()
        result[f"{label}_replayed_on_decode_stream_sms"] = len(set(out.unique().tolist()) - {-1})
    return result


def part_corun(torch) -> dict[str, Any]:
    """Proxies (as in the issue): a prefill-like bf16 GEMM and decode-like skinny GEMMs, run one
    after the other on the whole GPU vs at once on each preset's partitions."""
    from rollout_accel.serving.smshare.partitions import PartitionSet

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    weights = [torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(48)]

    def prefill() -> None:
        for _ in range(4):
            a @ w

    def decode() -> None:
        for _ in range(16):
            for m in weights:
                x @ m

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize()
        began = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - began

    whole_seq = timed(lambda: (prefill(), decode()))
    ps = PartitionSet.create(torch.device("cuda", 0))
    rows = []
    try:
        for preset in ps.presets:

            def both(preset=preset) -> None:
                main = torch.cuda.current_stream()
                for part, fn in ((preset.prefill, prefill), (preset.decode, decode)):
                    part.stream.wait_stream(main)
                    with torch.cuda.stream(part.stream):
                        fn()
                for part in (preset.prefill, preset.decode):
                    main.wait_stream(part.stream)

            def alone(part, fn) -> None:
                part.stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(part.stream):
                    fn()
                torch.cuda.current_stream().wait_stream(part.stream)

            concurrent = timed(both)
            rows.append(
                {
                    "preset": preset.name,
                    "prefill_alone_ms": timed(lambda p=preset: alone(p.prefill, prefill)) * 1e3,
                    "decode_alone_ms": timed(lambda p=preset: alone(p.decode, decode)) * 1e3,
                    "concurrent_ms": concurrent * 1e3,
                    "speedup_vs_whole_sequential": whole_seq / concurrent,
                }
            )
    finally:
        ps.close()
    return {
        "whole_prefill_ms": timed(prefill) * 1e3,
        "whole_decode_ms": timed(decode) * 1e3,
        "whole_sequential_ms": whole_seq * 1e3,
        "presets": rows,
        "ok": bool(rows),
    }


# -- (b) leaks ------------------------------------------------------------------------------------
def part_b(torch) -> dict[str, Any]:
    from rollout_accel.serving.smshare.partitions import PartitionSet, live_handles

    device = torch.device("cuda", 0)
    torch.cuda.synchronize()
    free0, _ = torch.cuda.mem_get_info()
    handles0 = live_handles()
    ps = PartitionSet.create(device)
    num_presets = len(ps.presets)
    main = torch.cuda.current_stream()
    a = torch.zeros(1 << 20, device="cuda")
    b = torch.zeros(1 << 20, device="cuda")
    torch.cuda.synchronize()
    alloc0 = torch.cuda.memory_allocated()
    began = time.perf_counter()
    for i in range(1000):
        preset = ps.presets[i % len(ps.presets)]
        start = torch.cuda.Event()
        start.record(main)
        preset.decode.stream.wait_event(start)
        preset.prefill.stream.wait_event(start)
        with torch.cuda.stream(preset.decode.stream):
            a.add_(1)
        with torch.cuda.stream(preset.prefill.stream):
            b.add_(1)
        main.wait_stream(preset.decode.stream)
        main.wait_stream(preset.prefill.stream)
    torch.cuda.synchronize()
    per_switch_us = (time.perf_counter() - began) / 1000 * 1e6
    alloc1 = torch.cuda.memory_allocated()
    values_ok = float(a[0]) == 1000.0 and float(b[-1]) == 1000.0
    during = live_handles()
    ps.close()
    for _ in range(20):
        PartitionSet.create(device).close()
    torch.cuda.synchronize()
    del a, b
    torch.cuda.empty_cache()
    free1, _ = torch.cuda.mem_get_info()
    handles1 = live_handles()
    drift_mib = (free0 - free1) / 2**20
    return {
        "switches": 1000,
        "presets": num_presets,
        "host_us_per_switch": per_switch_us,
        "allocated_delta_bytes": alloc1 - alloc0,
        "handles_before": handles0,
        "handles_during": during,
        "handles_after": handles1,
        "free_memory_drift_mib": drift_mib,
        "values_ok": values_ok,
        "ok": values_ok and alloc1 == alloc0 and handles1 == handles0 and drift_mib < 64,
    }


# -- (c) the concurrent runner: outputs, then a mixed-workload bench ------------------------------
def _generate(engine, prompts, params) -> tuple[list[list[int]], float]:
    engine.flush_cache()
    began = time.perf_counter()
    outs = engine.generate(input_ids=prompts, sampling_params=params)
    return [o["output_ids"] for o in outs], time.perf_counter() - began


def part_c_outputs(torch) -> dict[str, Any]:
    """tiny-qwen3 fp32: SM-shared outputs (every preset, adaptive) == the plain runner's, greedy
    and seeded temperature 1 (the GPU test asserts the same)."""
    import numpy as np

    from rollout_accel.serving.engine import Engine

    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 500, size=n).tolist() for n in (300, 20, 180, 90, 5, 140)]
    greedy = {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True}
    sampled = {"temperature": 1.0, "sampling_seed": 11, "max_new_tokens": 32, "ignore_eos": True}
    with Engine(
        "tiny-qwen3", dtype="float32", device="cuda", max_prefill_tokens=64, sm_share=True
    ) as engine:
        runner = engine.runner
        if not runner.available:
            return {"ok": False, "error": f"unavailable: {runner.unavailable_reason}"}
        rows: dict[str, Any] = {}
        for label, params in (("greedy", greedy), ("seeded_t1", sampled)):
            engine.loop.call(lambda: runner.set_mode("eager"))
            plain, _ = _generate(engine, prompts, params)
            runs = [("sequential", None), ("adaptive", None)]
            runs += [(preset.name, preset.index) for preset in runner.partitions.presets]
            for name, index in runs:
                mode = name if index is None else "static"
                engine.loop.call(lambda m=mode, i=index: runner.set_mode(m, i))
                before = runner.concurrent_steps + runner.sequential_steps
                outs, _ = _generate(engine, prompts, params)
                same = sum(a == b for a, b in zip(outs, plain, strict=True))
                rows[f"{label} {name}"] = {
                    "identical": f"{same}/{len(prompts)}",
                    "graphed_steps": runner.concurrent_steps + runner.sequential_steps - before,
                }
        engine.loop.call(lambda: runner.set_mode("time-share"))
        ok = all(r["identical"] == f"{len(prompts)}/{len(prompts)}" for r in rows.values())
        ok = ok and all(r["graphed_steps"] > 0 for r in rows.values())
        return {"runs": rows, "alive": engine.alive, "ok": ok and engine.alive}


# The part-c bench's engine (the GEMM probe starts the same one per partition layout).
BENCH_ENGINE: dict[str, Any] = {
    "dtype": "bfloat16",
    "device": "cuda",
    "max_prefill_tokens": 512,
    "max_running_requests": 64,
    "cuda_graph_max_bs": 64,
    "context_length": 4096,
    "sm_share": True,
    "seed": 1,
}


def part_c_bench(torch, out: Path) -> dict[str, Any]:
    """qwen3-0.6b-shape bf16: a mixed workload (a running batch of short prompts decoding while
    long prompts prefill in 512-token chunks) eager (one merged forward per mixed step: the
    engine before prefill-chunk graphs), sequential (the engine's default now: decode graph, then
    prefill-chunk graph, on the whole GPU; isolates concurrency's gain) vs SM-shared (adaptive,
    static on two presets).
    Output tokens/s side by side in one process, and the per-step timeline of each run (JSON)."""
    import numpy as np

    from rollout_accel.serving.engine import Engine

    rng = np.random.default_rng(5)
    short = [rng.integers(10, 30000, size=64).tolist() for _ in range(32)]
    long = [rng.integers(10, 30000, size=int(n)).tolist() for n in rng.integers(1000, 2000, 24)]
    prompts = short + long
    params = [{"temperature": 0, "max_new_tokens": 96, "ignore_eos": True}] * len(short)
    params += [{"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}] * len(long)
    new_tokens = 96 * len(short) + 8 * len(long)
    with Engine("qwen3-0.6b-shape", **BENCH_ENGINE) as engine:
        runner = engine.runner
        if not runner.available:
            return {"ok": False, "error": f"unavailable: {runner.unavailable_reason}"}
        presets = runner.partitions.presets
        modes: list[tuple[str, str, int | None]] = [("eager", "eager", None)]
        modes.append(("sequential", "sequential", None))
        modes.append(("adaptive", "adaptive", None))
        for preset in (presets[0], presets[len(presets) // 2]):
            modes.append((f"static {preset.name}", "static", preset.index))
        for mode in ("eager", "sequential"):  # warm-up: both paths compile before measuring
            engine.loop.call(lambda m=mode: runner.set_mode(m))
            _generate(engine, prompts[:8] + prompts[-2:], params[:8] + params[-2:])
        rows: dict[str, Any] = {}
        timelines: dict[str, list[dict[str, Any]]] = {}
        reference: list[list[int]] | None = None
        for label, mode, index in modes:
            engine.loop.call(lambda m=mode, i=index: runner.set_mode(m, i))
            engine.loop.call(lambda: runner.timeline.clear())
            before = (runner.concurrent_steps, runner.ungraphable_steps, runner.sequential_steps)
            outs, seconds = _generate(engine, prompts, params)
            engine.loop.call(lambda: torch.cuda.synchronize())
            engine.loop.call(runner._poll_timings)
            steps = list(runner.timeline)
            reference = outs if reference is None else reference
            rows[label] = {
                "seconds": round(seconds, 3),
                "tokens_per_s": round(new_tokens / seconds, 1),
                "concurrent_steps": runner.concurrent_steps - before[0],
                "sequential_steps": runner.sequential_steps - before[2],
                "ungraphable_mixed_steps": runner.ungraphable_steps - before[1],
                "identical_to_eager": sum(a == b for a, b in zip(outs, reference, strict=True)),
                "mixed_steps_planned": len(steps),
                "mean_mixed_step_ms": round(
                    1e3 * sum(r.measured_s for r in steps) / max(1, len(steps)), 3
                ),
            }
            if mode != "eager":
                t0 = steps[0].time if steps else 0.0
                timelines[label] = [
                    {
                        "t_s": round(r.time - t0, 5),
                        "preset": r.preset,
                        "decode_rows": r.decode_rows,
                        "prefill_tokens": r.prefill_tokens,
                        "predicted_ms": round(r.predicted_s * 1e3, 3),
                        "measured_ms": round(r.measured_s * 1e3, 3),
                    }
                    for r in steps
                ]
        engine.loop.call(lambda: runner.set_mode("time-share"))
        base = rows["eager"]["tokens_per_s"]
        seq = rows["sequential"]["tokens_per_s"]
        for row in rows.values():
            row["vs_eager"] = round(row["tokens_per_s"] / base, 3)
            row["vs_sequential"] = round(row["tokens_per_s"] / seq, 3)
        (out / "smshare_timeline.json").write_text(json.dumps(timelines))
        return {
            "requests": len(prompts),
            "output_tokens": new_tokens,
            "runs": rows,
            "timeline_json": str(out / "smshare_timeline.json"),
            "alive": engine.alive,
            # Honest: ok means it ran and stayed alive; the ratio is a measurement, not a gate.
            "ok": engine.alive,
        }


# -- main -----------------------------------------------------------------------------------------
class PartTimeout(Exception):
    """A part ran past its time limit."""


def _part(name: str, results: dict[str, Any], limit_s: int, fn, *args) -> None:
    """Runs one part bounded by `limit_s` (SIGALRM in the main thread); a failing part prints
    its exception and the others still run."""
    import signal

    def expired(signum, frame):
        raise PartTimeout(f"{name} ran past {limit_s} s")

    began = time.perf_counter()
    print(f"== {name}", flush=True)
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(limit_s)
    try:
        results[name] = fn(*args)
    except Exception as exc:  # one failing part must not stop the others
        traceback.print_exc()
        results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    results[name]["seconds"] = round(time.perf_counter() - began, 1)
    print(json.dumps(results[name], indent=1, default=str), flush=True)


def _child(name: str, results: dict[str, Any], limit_s: int, out: Path) -> None:
    """Runs part `name` in a child process: an abort there (a CUDA error raised in a destructor
    ends the process) or a hang costs that part only, never the table."""
    import subprocess

    began = time.perf_counter()
    print(f"== {name} (child process)", flush=True)
    path = out / f"part_{name}.json"
    path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name]
    try:
        proc = subprocess.run(cmd, timeout=limit_s, check=False)
        rc: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        rc = f"killed after {limit_s} s"
    if path.exists():
        results[name] = json.loads(path.read_text())
    else:
        results[name] = {"ok": False, "error": f"child process ended without a result (rc {rc})"}
    results[name]["seconds"] = round(time.perf_counter() - began, 1)


CHILD_PARTS = {"c_outputs_tiny_fp32": 60, "c_bench_0.6b_bf16": 85}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--scenario", action="store_true", help="also run `rollout bench --scenario smshare`"
    )
    parser.add_argument("--part", choices=sorted(CHILD_PARTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    expose_repo()
    layout = os.environ.get("SMSHARE_LAYOUT")  # a partition layout to try (partitions.LAYOUTS)
    if layout:
        from rollout_accel.serving.smshare import partitions

        partitions.DEFAULT_LAYOUT = layout
    if args.part:  # a child of the run below: one part, its JSON to $OUT/part_<name>.json
        import torch

        out = Path(os.environ.get("OUT", "out"))
        one: dict[str, Any] = {}
        limit = CHILD_PARTS[args.part] - 10
        if args.part == "c_outputs_tiny_fp32":
            _part(args.part, one, limit, part_c_outputs, torch)
        else:
            _part(args.part, one, limit, part_c_bench, torch, out)
        (out / f"part_{args.part}.json").write_text(json.dumps(one[args.part], default=str))
        return 0
    import logging

    import torch

    logging.basicConfig(level=logging.INFO)
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    from rollout_accel.serving.smshare.partitions import unsupported_reason

    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "layout": os.environ.get("SMSHARE_LAYOUT", "split"),
    }
    why = unsupported_reason(torch.device("cuda", 0)) if torch.cuda.is_available() else "no GPU"
    results["green_contexts"] = why or "ok"
    if why is not None:
        print(f"green contexts unavailable: {why}")
    _part("a_smid_disjoint", results, 30, part_a, torch)
    _part("a2_corun_proxies", results, 25, part_corun, torch)
    _part("b_no_leak", results, 25, part_b, torch)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the children get the memory these parts cached
    for name, limit in CHILD_PARTS.items():
        _child(name, results, limit, out)
    if args.scenario:

        def bench() -> dict[str, Any]:
            from rollout_accel.rollout.bench import smshare_scenario

            rc = smshare_scenario.main(["--out", str(out)])
            path = out / "smshare_bench.json"
            data = json.loads(path.read_text()) if path.exists() and rc == 0 else {}
            return {"rc": rc, "results": data.get("results"), "ok": rc == 0}

        _part("d_scenario", results, 300, bench)
    (out / "gpu_smshare.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\ndevice: {results['device']}  green contexts: {results['green_contexts']}")
    print(f"{'part':<24}{'ok':>6}{'s':>8}  note")
    for name, res in results.items():
        if isinstance(res, dict):
            note = res.get("error", "")
            if name == "a2_corun_proxies" and res.get("presets"):
                best = max(res["presets"], key=lambda r: r["speedup_vs_whole_sequential"])
                note = f"best {best['preset']}: {best['speedup_vs_whole_sequential']:.2f}x vs sequential"
            if name == "b_no_leak" and "host_us_per_switch" in res:
                note = f"{res['host_us_per_switch']:.1f} us/switch, drift {res['free_memory_drift_mib']:.1f} MiB"
            if name == "c_outputs_tiny_fp32" and "runs" in res:
                bad = [
                    k for k, r in res["runs"].items() if len(set(r["identical"].split("/"))) != 1
                ]
                note = f"{len(res['runs'])} runs, differing: {bad or 'none'}"
            if name == "c_bench_0.6b_bf16" and "runs" in res:
                note = ", ".join(
                    f"{k} {r['vs_sequential']:.2f}x seq ({r['concurrent_steps']} conc)"
                    for k, r in res["runs"].items()
                    if k != "eager"
                )
            print(f"{name:<24}{res.get('ok')!s:>6}{res.get('seconds', 0):>8}  {note[:90]}")
    runs = results.get("c_bench_0.6b_bf16", {}).get("runs") or {}
    if runs:
        print(f"\nmixed workload, qwen3-0.6b-shape bf16 ({results['device']}):")
        print(
            f"{'mode':<16}{'tok/s':>10}{'x eager':>14}{'x sequential':>14}"
            f"{'concurrent':>12}{'ungraphable':>13}"
        )
        for mode, r in runs.items():
            print(
                f"{mode:<16}{r['tokens_per_s']:>10}{r['vs_eager']:>14}{r['vs_sequential']:>14}"
                f"{r['concurrent_steps']:>12}{r['ungraphable_mixed_steps']:>13}"
            )
    bench = results.get("d_scenario", {}).get("results") or {}
    if bench:
        from rollout_accel.rollout.bench.smshare_scenario import format_table

        print(format_table(bench))
    print(f"wrote {out / 'gpu_smshare.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
