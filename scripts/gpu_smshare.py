"""SM sharing on one GPU (issue 14), in one go (~4 minutes on an H200):

    python scripts/gpu_smshare.py [--skip-bench]

  (a) partitions are disjoint: a Triton kernel reads %smid on each partition's stream (alone and
      both at once); also a graph captured on the decode stream vs one captured elsewhere and
      replayed there (does a foreign graph keep to the partition?); then prefill/decode proxy
      GEMMs at once on each preset vs one after the other on the whole GPU;
  (b) 1,000 preset switches (and 20 create/close cycles) leak no memory, contexts or streams;
  (c) greedy outputs: SM-shared (every preset, adaptive) == the same decomposition run one part
      after the other on one stream (exact), and vs time-sharing (today), at tiny-qwen3 fp32 and
      qwen3-0.6b-shape bf16;
  (d) the bench scenario (time-share / static / adaptive) at qwen3-0.6b-shape.
Each part runs on its own: a failing part prints its exception and the others still run.
Prints a table last; writes JSON (and the timeline PNG) to $OUT (default ./out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _import_path() -> None:
    """Run from a checkout without installing: expose the repo as `rollout_accel`."""
    try:
        import rollout_accel.serving  # noqa: F401
    except ImportError:
        link_dir = Path(tempfile.mkdtemp())
        (link_dir / "rollout_accel").symlink_to(ROOT)
        sys.path.insert(0, str(link_dir))


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


# -- (c) outputs ----------------------------------------------------------------------------------
def _prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    lens = rng.integers(16, 1500, size=n)
    return [rng.integers(10, min(vocab, 30000), size=int(k)).tolist() for k in lens]


def _outputs(engine, prompts, new: int) -> list[list[int]]:
    engine.flush_cache()
    outs = engine.generate(
        input_ids=prompts,
        sampling_params={"temperature": 0, "max_new_tokens": new, "ignore_eos": True},
    )
    return [o["output_ids"] for o in outs]


def part_c(torch, model: str, dtype: str) -> dict[str, Any]:
    from rollout_accel.serving.engine import Engine

    with Engine(
        model,
        dtype=dtype,
        device="cuda",
        max_prefill_tokens=512,
        max_running_requests=64,
        cuda_graph_max_bs=64,
        context_length=4096,
        sm_share=True,
        seed=1,
    ) as engine:
        runner = engine.runner
        if not runner.available:
            return {"ok": False, "error": f"unavailable: {runner.unavailable_reason}"}
        prompts = _prompts(24, engine.model_config.vocab_size, 5)

        def run(mode: str, preset: int | None = None) -> list[list[int]]:
            engine.loop.call(lambda: runner.set_mode(mode, preset))
            before = runner.concurrent_steps
            outs = _outputs(engine, prompts, 48)
            counts[f"{mode}{'' if preset is None else ' ' + str(preset)}"] = (
                runner.concurrent_steps - before
            )
            return outs

        def same(a: list[list[int]], b: list[list[int]]) -> str:
            return f"{sum(x == y for x, y in zip(a, b, strict=True))}/{len(a)}"

        counts: dict[str, int] = {}
        time_shared = run("time-share")
        split = run("split")
        rows = {}
        for preset in runner.partitions.presets:
            rows[preset.name] = same(run("static", preset.index), split)
        adaptive = run("adaptive")
        engine.loop.call(lambda: runner.set_mode("time-share"))
        full = f"{len(prompts)}/{len(prompts)}"
        # Exact: SM-shared steps vs the same two parts run one after the other (same kernels,
        # same shapes). Time-sharing runs ONE merged forward per mixed step, so bf16 rounding
        # may differ from the split runs; adaptive mixes both kinds of step.
        return {
            "model": model,
            "dtype": dtype,
            "static_vs_split_identical_sequences": rows,
            "split_vs_time_share_identical_sequences": same(split, time_shared),
            "adaptive_vs_time_share_identical_sequences": same(adaptive, time_shared),
            "adaptive_vs_split_identical_sequences": same(adaptive, split),
            "concurrent_steps": counts,
            "ok": all(v == full for v in rows.values()) and counts.get("static 0", 0) > 0,
        }


# -- main -----------------------------------------------------------------------------------------
def _part(name: str, results: dict[str, Any], fn, *args) -> None:
    began = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        results[name] = fn(*args)
    except Exception as exc:  # one failing part must not stop the others
        traceback.print_exc()
        results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    results[name]["seconds"] = round(time.perf_counter() - began, 1)
    print(json.dumps(results[name], indent=1, default=str), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-bench", action="store_true")
    args = parser.parse_args()
    _import_path()
    import logging

    import torch

    logging.basicConfig(level=logging.INFO)
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    from rollout_accel.serving.smshare.partitions import unsupported_reason

    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
    }
    why = unsupported_reason(torch.device("cuda", 0)) if torch.cuda.is_available() else "no GPU"
    results["green_contexts"] = why or "ok"
    if why is not None:
        print(f"green contexts unavailable: {why}")
    _part("a_smid_disjoint", results, part_a, torch)
    _part("a2_corun_proxies", results, part_corun, torch)
    _part("b_no_leak", results, part_b, torch)
    _part("c_outputs_tiny_fp32", results, part_c, torch, "tiny-qwen3", "float32")
    _part("c_outputs_0.6b_bf16", results, part_c, torch, "qwen3-0.6b-shape", "bfloat16")
    if not args.skip_bench:

        def bench() -> dict[str, Any]:
            from rollout_accel.rollout.bench import smshare_scenario

            rc = smshare_scenario.main(["--out", str(out)])
            path = out / "smshare_bench.json"
            data = json.loads(path.read_text()) if path.exists() and rc == 0 else {}
            return {"rc": rc, "results": data.get("results"), "ok": rc == 0}

        _part("d_bench", results, bench)
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
            if name.startswith("c_") and "split_vs_time_share_identical_sequences" in res:
                note = (
                    f"shared==split {sorted(set(res['static_vs_split_identical_sequences'].values()))}"
                    f", split==time-share {res['split_vs_time_share_identical_sequences']}"
                )
            print(f"{name:<24}{res.get('ok')!s:>6}{res.get('seconds', 0):>8}  {note[:90]}")
    bench = results.get("d_bench", {}).get("results") or {}
    if bench:
        from rollout_accel.rollout.bench.smshare_scenario import format_table

        print(format_table(bench))
    print(f"wrote {out / 'gpu_smshare.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
