"""Runs the Triton attention kernels under Triton's CPU interpreter against the reference.

Usage, from the repository root: python -m tests.kernels.paged_attention_interpret [decode|prefill|dispatch]
Exits 1 if any case fails. TRITON_INTERPRET must be set before triton is imported (it is read
when `@triton.jit` decorates), hence a script of its own run in a fresh process by the tests.

bfloat16 is not run here: Triton 3.9's interpreter multiplies the raw uint16 bit patterns in
`tl.dot` for bfloat16, so only float32 and float16 give meaningful answers on the CPU.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import sys
import time

import torch

from rollout_accel.kernels import attention
from rollout_accel.kernels.backend import reload_overrides
from rollout_accel.kernels.paged_attention_reference import (
    paged_decode_attention_reference,
    paged_prefill_attention_reference,
)
from rollout_accel.kernels.paged_attention_triton import (
    DecodeConfig,
    PrefillConfig,
    paged_decode_attention,
    paged_prefill_attention,
)
from tests.kernels.paged_attention_cases import PagedAttentionCase, make_case, rel_err

F32, F16 = torch.float32, torch.float16
TOL = {F32: 1e-5, F16: 1e-2}
FAILURES: list[str] = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def decode_ref(case: PagedAttentionCase) -> torch.Tensor:
    """Reference on float32-upcast inputs: the oracle in higher precision than fp16 inputs."""
    return paged_decode_attention_reference(
        case.q.float(),
        case.k_cache.float(),
        case.v_cache.float(),
        case.block_table,
        case.seq_lens,
        case.page_size,
        case.scale,
    )


def prefill_ref(case: PagedAttentionCase) -> torch.Tensor:
    return paged_prefill_attention_reference(
        case.q.float(),
        case.k_cache.float(),
        case.v_cache.float(),
        case.block_table,
        case.cu_q_lens,
        case.seq_lens,
        case.page_size,
        case.scale,
    )


def run_decode(gen: torch.Generator) -> None:
    # (seq_lens, Hq, Hkv, D, page_size, dtype, num_splits, block_n)
    cases = [
        ([1, 17, 40, 5], 4, 2, 32, 1, F32, 1, 16),
        ([1, 17, 40, 5], 4, 2, 32, 1, F32, 3, 16),
        ([16, 33, 7], 8, 1, 32, 16, F32, 4, 16),  # group 8, several tiles per chunk
        ([9, 50], 4, 4, 24, 16, F32, 2, 16),  # no grouping; head_dim not a power of 2
        ([20, 3, 31], 4, 2, 32, 1, F32, 7, 16),  # chunks past the end of short sequences
        ([70, 3, 31], 4, 2, 64, 16, F16, None, None),  # default splits and config
        ([70, 3, 31], 4, 2, 64, 1, F16, 1, 32),
        ([45, 12], 16, 8, 32, 16, F16, 3, 16),  # the 16/8 head layout of the target models
    ]
    for seq_lens, hq, hkv, d, page, dtype, splits, block_n in cases:
        case = make_case(seq_lens, [1] * len(seq_lens), hq, hkv, d, page, dtype, gen=gen)
        cfg = None if block_n is None else DecodeConfig(block_n=block_n, num_warps=4, num_stages=1)
        out = torch.full_like(case.q, float("nan"))
        t0 = time.perf_counter()
        paged_decode_attention(
            case.q,
            case.k_cache,
            case.v_cache,
            case.block_table,
            case.seq_lens,
            page,
            case.scale,
            out,
            num_splits=splits,
            config=cfg,
        )
        err = rel_err(out, decode_ref(case))
        name = f"decode lens={seq_lens} h={hq}/{hkv} d={d} page={page} {dtype} splits={splits}"
        ok = bool(torch.isfinite(out).all()) and err <= TOL[dtype]
        report(name, ok, f"rel_err={err:.2e} ({time.perf_counter() - t0:.2f}s)")

    # A zero-length row (CUDA-graph padding) must write zeros, split or not, and leave others right.
    for splits in (1, 4):
        case = make_case([0, 21, 6], [0, 1, 1], 4, 2, 32, 1, F32, gen=gen)
        q = torch.cat([torch.randn(1, 4, 32, generator=gen), case.q])
        out = torch.full_like(q, float("nan"))
        cfg = DecodeConfig(block_n=16, num_warps=4, num_stages=1)
        args = (case.k_cache, case.v_cache, case.block_table, case.seq_lens, 1, case.scale)
        paged_decode_attention(q, *args, out, num_splits=splits, config=cfg)
        ref = paged_decode_attention_reference(q, *args)
        zeros_ok = bool((out[0] == 0).all())
        err = rel_err(out[1:], ref[1:])
        report(
            f"decode seq_len=0 row splits={splits}",
            zeros_ok and err <= TOL[F32],
            f"row0 zero={zeros_ok} rel_err(rest)={err:.2e}",
        )


def run_prefill(gen: torch.Generator) -> None:
    # (seq_lens, q_lens, Hq, Hkv, D, page_size, dtype, (block_m, block_n) or None, pass max_q_len)
    cases = [
        ([10, 40, 30, 5], [3, 40, 1, 0], 4, 2, 32, 1, F32, (16, 16), True),
        ([50, 37], [20, 37], 4, 2, 32, 16, F32, (16, 16), False),
        ([64, 23], [33, 5], 8, 1, 24, 16, F32, (16, 16), True),  # group 8, head_dim 24
        ([61, 40], [29, 40], 4, 2, 32, 16, F32, (32, 16), True),  # BLOCK_M > BLOCK_N
        ([61, 40], [29, 40], 4, 2, 32, 1, F32, (16, 32), True),  # BLOCK_N > BLOCK_M
        ([45, 70], [45, 18], 4, 2, 64, 16, F16, None, True),  # default config
        ([45, 70, 9], [45, 18, 9], 16, 8, 32, 1, F16, (32, 16), False),
    ]
    for seq_lens, q_lens, hq, hkv, d, page, dtype, tiles, pass_max in cases:
        case = make_case(seq_lens, q_lens, hq, hkv, d, page, dtype, gen=gen)
        cfg = None if tiles is None else PrefillConfig(tiles[0], tiles[1], 4, 1)
        out = torch.full_like(case.q, float("nan"))
        t0 = time.perf_counter()
        paged_prefill_attention(
            case.q,
            case.k_cache,
            case.v_cache,
            case.block_table,
            case.cu_q_lens,
            case.seq_lens,
            page,
            case.scale,
            case.max_q_len if pass_max else None,
            out,
            config=cfg,
        )
        err = rel_err(out, prefill_ref(case))
        name = (
            f"prefill lens={seq_lens} q={q_lens} h={hq}/{hkv} d={d} page={page} {dtype} "
            f"tiles={tiles}"
        )
        ok = bool(torch.isfinite(out).all()) and err <= TOL[dtype]
        report(name, ok, f"rel_err={err:.2e} ({time.perf_counter() - t0:.2f}s)")

    # q_len == 1 everywhere is decode: both kernels must agree.
    case = make_case([30, 7, 18], [1, 1, 1], 4, 2, 32, 16, F32, gen=gen)
    args = (case.q, case.k_cache, case.v_cache, case.block_table)
    pre = paged_prefill_attention(
        *args, case.cu_q_lens, case.seq_lens, 16, case.scale, 1, config=PrefillConfig(16, 16, 4, 1)
    )
    dec = paged_decode_attention(
        *args, case.seq_lens, 16, case.scale, num_splits=2, config=DecodeConfig(16, 4, 1)
    )
    err = rel_err(pre, dec)
    report("prefill(q_len=1) == decode", err <= 1e-5, f"rel_err={err:.2e}")


def run_dispatch(gen: torch.Generator) -> None:
    """ROLLOUT_ACCEL_ATTENTION=triton routes CPU tensors to the (interpreted) Triton kernels."""
    os.environ[attention.ENV_VAR] = "triton"
    reload_overrides()
    report(
        "dispatch forced triton",
        attention.attention_backend(torch.device("cpu")) == "triton",
        "backend=" + attention.attention_backend(torch.device("cpu")),
    )
    case = make_case([12, 30], [1, 1], 4, 2, 32, 1, F32, gen=gen)
    got = attention.decode_attention(
        case.q, case.k_cache, case.v_cache, case.block_table, case.seq_lens, 1, case.scale
    )
    direct = paged_decode_attention(
        case.q, case.k_cache, case.v_cache, case.block_table, case.seq_lens, 1, case.scale
    )
    err = rel_err(got, decode_ref(case))
    report("dispatch decode", torch.equal(got, direct) and err <= 1e-5, f"rel_err={err:.2e}")
    case = make_case([12, 30], [5, 30], 4, 2, 32, 16, F32, gen=gen)
    got = attention.prefill_attention(
        case.q,
        case.k_cache,
        case.v_cache,
        case.block_table,
        case.cu_q_lens,
        case.seq_lens,
        16,
        case.scale,
        case.max_q_len,
    )
    err = rel_err(got, prefill_ref(case))
    report("dispatch prefill", err <= 1e-5, f"rel_err={err:.2e}")


def main(argv: list[str]) -> int:
    runners = {"decode": run_decode, "prefill": run_prefill, "dispatch": run_dispatch}
    which = argv[1:] or list(runners)
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    print(f"seed={gen.initial_seed()}")
    for name in which:
        runners[name](gen)
    print(f"{len(FAILURES)} failure(s)")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
