"""Which green-context partitions can run cuBLAS bf16 tensor-core GEMMs (one H200, ~1 min).

The SM-sharing bench failed at start-up with CUBLAS_STATUS_EXECUTION_FAILED on its first bf16
GEMM on a partition stream, while fp32 GEMMs and Triton kernels ran there. Hypothesis: Hopper's
bf16 cuBLAS kernels launch thread-block clusters, and a partition made of the split's *remainder*
(the decode side here: 12, 20, ... SMs) need not hold whole cluster-capable SM groups. This probe
runs, each in a fresh process (a failed launch may poison the context):
  - a split made as the engine makes it (group = prefill, remainder = decode), the reverse
    (group = decode, remainder = prefill), and both sides as groups (decode split off first, the
    remainder split again), for decode sizes on and off multiples of 8;
  - on each side: bf16 and fp32 matmuls of a decode-like (64 x 1024 x 3072) and a prefill-like
    (2048 x 1024 x 3072) shape, with the green context current and not.

    python scripts/gpu_smshare_gemm_probe.py      # table last; JSON to $OUT/gemm_probe.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from repo_path import expose_repo

DECODE_SIZES = (12, 16, 28, 32)


def child(decode_sms: int, reverse: str, side: str, dtype: str, push: bool) -> dict:
    import torch

    from rollout_accel.serving.smshare import partitions as parts

    driver = parts._driver()
    parts._call(driver, "cuInit", 0)
    torch.cuda.init()
    dev = parts._call(driver, "cuDeviceGet", 0)
    whole = parts._call(
        driver, "cuDeviceGetDevResource", dev, driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM
    )
    total = int(whole.sm.smCount)
    if reverse == "groups":
        # Both sides as split *groups*: decode first, then the remainder split again (as much
        # of it as the driver will group), so neither side is a raw remainder.
        result, _, rest = parts._call(
            driver, "cuDevSmResourceSplitByCount", 1, whole, 0, decode_sms
        )
        decode_res = result[0]
        prefill_res = None
        for count in range(int(rest.sm.smCount), 0, -2):
            try:
                again, _, _ = parts._call(driver, "cuDevSmResourceSplitByCount", 1, rest, 0, count)
            except parts.GreenContextError:
                continue
            prefill_res = again[0]
            break
        if prefill_res is None:
            return {"error": "the remainder could not be grouped"}
    else:
        min_count = decode_sms if reverse == "1" else total - decode_sms
        result, _, remainder = parts._call(
            driver, "cuDevSmResourceSplitByCount", 1, whole, 0, min_count
        )
        group = result[0]
        decode_res, prefill_res = (group, remainder) if reverse == "1" else (remainder, group)
    res = decode_res if side == "decode" else prefill_res
    part = parts._make_partition(driver, dev, torch.device("cuda", 0), res)
    dt = getattr(torch, dtype)
    out: dict = {"sms": part.sms}
    for name, m in (("decode-like", 64), ("prefill-like", 2048)):
        a = torch.randn(m, 1024, device="cuda", dtype=dt)
        b = torch.randn(1024, 3072, device="cuda", dtype=dt)
        ref = (a.float() @ b.float()).to(dt)
        c = torch.empty(m, 3072, device="cuda", dtype=dt)
        torch.cuda.synchronize()
        try:
            if push:
                ctx = parts._call(driver, "cuCtxFromGreenCtx", part._context)
                parts._call(driver, "cuCtxPushCurrent", ctx)
            try:
                with torch.cuda.stream(part.stream):
                    torch.matmul(a, b, out=c)
                part.stream.synchronize()
            finally:
                if push:
                    parts._call(driver, "cuCtxPopCurrent")
            err = float((c.float() - ref.float()).abs().max() / ref.float().abs().max())
            out[name] = "ok" if err < 0.05 else f"wrong (rel err {err:.3g})"
        except Exception as exc:
            out[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
            break
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        decode_sms, reverse, side, dtype, push = sys.argv[2:7]
        row = child(int(decode_sms), reverse, side, dtype, push == "1")
        print("RESULT " + json.dumps(row))
        return 0
    env = {**os.environ, "PYTHONPATH": expose_repo()}
    jobs = [
        (decode_sms, reverse, side, dtype, push)
        for decode_sms in DECODE_SIZES
        for reverse in ("0", "1", "groups")
        for side in ("decode", "prefill")
        for dtype, push in (("bfloat16", "0"), ("bfloat16", "1"), ("float32", "0"))
    ]

    def run(job: tuple) -> dict:
        decode_sms, reverse, side, dtype, push = job
        cmd = [sys.executable, __file__, "--child", str(decode_sms), reverse, side, dtype, push]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            got = json.loads(line[-1][7:]) if line else {"error": proc.stderr[-300:]}
        except subprocess.TimeoutExpired:
            got = {"error": "timeout"}
        split = {"0": "group=prefill", "1": "group=decode", "groups": "both groups"}[reverse]
        row = {"decode_sms": decode_sms, "split": split, "side": side, "dtype": dtype}
        row.update(green_ctx_current=push == "1", **got)
        print(json.dumps(row), flush=True)
        return row

    # Independent processes, a few at a time (each makes its own partitions).
    with ThreadPoolExecutor(6) as pool:
        rows = list(pool.map(run, jobs))
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemm_probe.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{'decode':>6} {'split':<14} {'side':<8} {'dtype':<9} {'push':<5} {'sms':>4}  result")
    for r in rows:
        res = r.get("error") or f"{r.get('decode-like')} / {r.get('prefill-like')}"
        print(
            f"{r['decode_sms']:>6} {r['split']:<14} {r['side']:<8} {r['dtype']:<9} "
            f"{r['green_ctx_current']!s:<5} {r.get('sms', '-'):>4}  {res}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
