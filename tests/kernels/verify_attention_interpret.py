"""Runs the Triton verify-attention kernel under Triton's CPU interpreter against the reference.

Usage, from the repository root: python -m tests.kernels.verify_attention_interpret
Exits 1 if any case fails (TRITON_INTERPRET must be set before triton is imported, hence a
script run in a fresh process by the tests). float32 and float16 only (see
paged_attention_interpret for why bfloat16 cannot run in the interpreter).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import sys
import time

import torch

from rollout_accel.kernels import verify_attention
from rollout_accel.kernels.paged_attention_triton import DecodeConfig
from rollout_accel.kernels.verify_attention_reference import paged_verify_attention_reference
from rollout_accel.kernels.verify_attention_triton import paged_verify_attention
from tests.kernels.paged_attention_cases import rel_err
from tests.kernels.verify_attention_cases import make_verify_case

F32, F16 = torch.float32, torch.float16
TOL = {F32: 1e-5, F16: 1e-2}
FAILURES: list[str] = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def main() -> int:
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    print(f"seed={gen.initial_seed()}")
    # (seq_lens, q_lens, Hq, Hkv, D, page, dtype, num_splits, block_n)
    cases = [
        ([9, 40, 23, 5], [4, 4, 1, 0], 4, 2, 32, 1, F32, 1, 16),
        ([9, 40, 23, 5], [4, 2, 1, 3], 4, 2, 32, 1, F32, 3, 16),  # empty chunks, short rows
        ([33, 70], [8, 5], 16, 8, 32, 16, F32, 2, 16),  # the 16/8 layout, q_len 8
        ([17, 50], [3, 6], 8, 1, 24, 16, F32, 4, 16),  # group 8: 48 tile rows; head_dim 24
        ([64, 31, 7], [5, 5, 5], 4, 2, 64, 16, F16, None, None),  # defaults
    ]
    for seq_lens, q_lens, hq, hkv, d, page, dtype, splits, block_n in cases:
        case = make_verify_case(seq_lens, q_lens, hq, hkv, d, page, dtype, gen=gen, pad=3)
        cfg = None if block_n is None else DecodeConfig(block_n=block_n, num_warps=4, num_stages=1)
        total = case.base.q.shape[0]
        out = torch.full_like(case.q, float("nan"))
        t0 = time.perf_counter()
        paged_verify_attention(
            case.q, *case.args(), case.max_q_len, out, num_splits=splits, config=cfg
        )
        ref = paged_verify_attention_reference(
            case.q.float(),
            case.base.k_cache.float(),
            case.base.v_cache.float(),
            *case.args()[2:],
            case.max_q_len,
        )
        err = rel_err(out[:total], ref[:total])
        # Padding rows: untouched (direct) or zero (split merge), never another row's values.
        pad = out[total:]
        pad_ok = bool(((pad == 0) | pad.isnan()).all())
        name = f"verify lens={seq_lens} q={q_lens} h={hq}/{hkv} d={d} page={page} {dtype}"
        ok = bool(torch.isfinite(out[:total]).all()) and err <= TOL[dtype] and pad_ok
        report(name, ok, f"rel_err={err:.2e} pad_ok={pad_ok} ({time.perf_counter() - t0:.2f}s)")

    os.environ["ROLLOUT_ACCEL_ATTENTION"] = "triton"
    case = make_verify_case([12, 30], [3, 2], 4, 2, 32, 1, F32, gen=gen)
    got = verify_attention.verify_attention(case.q, *case.args(), 3)
    ref = paged_verify_attention_reference(case.q, *case.args(), 3)
    err = rel_err(got, ref)
    backend = verify_attention.verify_backend(torch.device("cpu"))
    report("dispatch forced triton", backend == "triton" and err <= 1e-5, f"rel_err={err:.2e}")
    print(f"{len(FAILURES)} failure(s)")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
