"""Which green-context partitions run cuBLAS bf16 GEMMs, eagerly and in CUDA graphs (one H200).

The SM-sharing bench failed at start-up with CUBLAS_STATUS_EXECUTION_FAILED on a bf16 GEMM on a
partition stream, while fp32 GEMMs and Triton kernels ran there (and an earlier session's eager
bf16 proxies ran on the same kind of partitions). This probe finds the failing step. Each child
process (a failed launch may poison its context) takes one partition layout (LAYOUTS in
serving/smshare/partitions.py) and one side of its middle preset, with the green context current
or not, and runs in order, recording each result:
  - eager: bf16 `x @ w` and `F.linear` at decode-like (64 rows) and prefill-like (2048) shapes;
  - captured: `F.linear` captured in a CUDA graph on the partition stream (global and
    thread_local capture modes) and replayed there, and the same from a fresh thread;
and one child per layout starts the real engine (qwen3-0.6b-shape bf16, sm_share=True) and
reports whether SM sharing came up, with the traceback if not.

    python scripts/gpu_smshare_gemm_probe.py      # table last; JSON to $OUT/gemm_probe.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from repo_path import expose_repo

LAYOUTS = ("split", "units", "units-strict")


def _checks(torch, part, push_ctx) -> dict:
    import torch.nn.functional as F

    dt = torch.bfloat16
    results: dict = {}

    def run(name, fn) -> None:
        torch.cuda.synchronize()
        try:
            with push_ctx():
                err = fn()
            results[name] = "ok" if err < 0.05 else f"wrong (rel err {err:.3g})"
        except Exception as exc:
            results[name] = f"{type(exc).__name__}: {str(exc)[:160]}"

    def rel(out, ref) -> float:
        return float((out.float() - ref.float()).abs().max() / ref.float().abs().max())

    w = torch.randn(3072, 1024, device="cuda", dtype=dt) / 32
    for rows in (64, 2048):
        x = torch.randn(rows, 1024, device="cuda", dtype=dt)
        ref = x.float() @ w.float().t()
        torch.cuda.synchronize()

        def eager_mm(x=x, ref=ref):
            with torch.cuda.stream(part.stream):
                out = x @ w.t().contiguous()
            part.stream.synchronize()
            return rel(out, ref)

        def eager_linear(x=x, ref=ref):
            with torch.cuda.stream(part.stream):
                out = F.linear(x, w)
            part.stream.synchronize()
            return rel(out, ref)

        run(f"eager_mm_{rows}", eager_mm)
        run(f"eager_linear_{rows}", eager_linear)

    x = torch.randn(64, 1024, device="cuda", dtype=dt)
    ref = x.float() @ w.float().t()

    def captured(mode: str):
        def fn():
            part.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(part.stream):
                F.linear(x, w)  # warm-up, as the engine's capture does
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=part.stream, capture_error_mode=mode):
                    out = F.linear(x, w)
                graph.replay()
            part.stream.synchronize()
            return rel(out, ref)

        return fn

    run("graph_global", captured("global"))
    run("graph_thread_local", captured("thread_local"))
    box: dict = {}

    def in_thread():
        torch.cuda.set_device(0)
        try:
            box["err"] = captured("thread_local")()
        except Exception as exc:
            box["exc"] = exc

    def fresh_thread():
        t = threading.Thread(target=in_thread)
        t.start()
        t.join()
        if "exc" in box:
            raise box["exc"]
        return box["err"]

    run("graph_new_thread", fresh_thread)
    return results


def child_side(layout: str, side: str, push: bool) -> dict:
    import contextlib

    import torch

    from rollout_accel.serving.smshare import partitions as parts

    torch.cuda.init()
    torch.zeros(1, device="cuda")
    ps = parts.PartitionSet.create(torch.device("cuda", 0), layout=layout)
    preset = ps.presets[len(ps.presets) // 2]
    part = preset.prefill if side == "prefill" else preset.decode
    driver = parts._driver()

    @contextlib.contextmanager
    def push_ctx():
        if not push:
            yield
            return
        ctx = parts._call(driver, "cuCtxFromGreenCtx", part._context)
        parts._call(driver, "cuCtxPushCurrent", ctx)
        try:
            yield
        finally:
            parts._call(driver, "cuCtxPopCurrent")

    out = {"presets": ps.describe(), "preset": preset.name, "sms": part.sms}
    out.update(_checks(torch, part, push_ctx))
    return out


def child_engine(layout: str) -> dict:
    import logging

    import torch

    from rollout_accel.serving.engine import Engine
    from rollout_accel.serving.smshare import partitions as parts

    logging.basicConfig(level=logging.INFO)
    parts.DEFAULT_LAYOUT = layout
    from gpu_smshare import BENCH_ENGINE  # a sibling script: the bench's own engine

    with Engine("qwen3-0.6b-shape", **BENCH_ENGINE) as engine:
        runner = engine.runner
        out = {"available": runner.available, "reason": runner.unavailable_reason}
        if runner.available:
            out["presets"] = runner.partitions.describe()
            outs = engine.generate(
                input_ids=[[5] * 700, [7] * 30],
                sampling_params={"temperature": 0, "max_new_tokens": 8, "ignore_eos": True},
            )
            out["generated"] = [len(o["output_ids"]) for o in outs]
            out["concurrent_steps"] = runner.concurrent_steps
        del torch
        return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        try:
            if sys.argv[2] == "engine":
                row = child_engine(sys.argv[3])
            else:
                row = child_side(sys.argv[2], sys.argv[3], sys.argv[4] == "1")
        except Exception as exc:
            row = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-1500:]}
        print("RESULT " + json.dumps(row), flush=True)
        return 0
    env = {**os.environ, "PYTHONPATH": expose_repo()}
    jobs = [("engine", layout) for layout in LAYOUTS]
    jobs += [
        (layout, side, push)
        for layout in LAYOUTS
        for side in ("decode", "prefill")
        for push in ("0", "1")
    ]

    def run(job: tuple) -> dict:
        cmd = [sys.executable, __file__, "--child", *job]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            got = json.loads(line[-1][7:]) if line else {"error": proc.stderr[-600:]}
            if job[0] == "engine":
                got["log_tail"] = [
                    x for x in proc.stderr.splitlines() if "SM sharing" in x or "rror" in x
                ][-8:]
        except subprocess.TimeoutExpired:
            got = {"error": "timeout"}
        row = {"job": " ".join(job), **got}
        print(json.dumps(row), flush=True)
        return row

    with ThreadPoolExecutor(8) as pool:
        rows = list(pool.map(run, jobs))
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemm_probe.json").write_text(json.dumps(rows, indent=1))
    print("\njob (layout side push | engine layout)  ->  results")
    for r in rows:
        keep = {k: v for k, v in r.items() if k not in ("job", "trace", "log_tail", "presets")}
        print(f"{r['job']:<24} {json.dumps(keep)[:400]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
