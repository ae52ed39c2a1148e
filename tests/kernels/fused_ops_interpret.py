"""Runs the fused-op Triton kernels under Triton's CPU interpreter against the HF references.

Usage, from the repository root: python -m tests.kernels.fused_ops_interpret [rows|qk|silu|dispatch]
Exits 1 if any case fails. TRITON_INTERPRET must be set before triton is imported, hence a script
of its own run in a fresh process by `test_fused_ops.py`.

bfloat16: Triton 3.9's interpreter rounds float32 -> bfloat16 casts toward zero (its "RTNE" branch
is also wrong: no carry, no ties-to-even), while the GPU rounds to nearest even. These kernels
have no dots, so `_fix_interpreter_bf16_rounding` swaps that one conversion for torch's (which
is RTNE, as on the GPU), making bfloat16 checkable on the CPU, bit for bit where torch agrees.

Each case checks the kernel (outputs pre-filled with NaN, so an unwritten element fails) against
  * the reference on float32-upcast inputs: rel_err <= REL_TOL[dtype] (the accuracy bar), and
  * the reference on the same inputs: max |diff| <= ULPS[dtype] ulps of the largest reference
    value (the rounding points match; only fp32 summation order and rsqrt/exp rounding differ;
    in practice float16/bfloat16 outputs come out bit-identical to torch's on the CPU).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import triton.language as tl
import triton.runtime.interpreter as _interp

from rollout_accel.kernels import fused_ops
from rollout_accel.kernels import fused_ops_triton as ft
from rollout_accel.kernels.backend import reload_overrides

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = (F32, F16, BF16)
REL_TOL = {F32: 1e-5, F16: 1e-2, BF16: 1e-2}
# float32 differs from torch by summation order (a few float32 ulps); halves round the same values.
ULPS = {F32: 8.0, F16: 2.0, BF16: 2.0}
FAILURES: list[str] = []


def _fix_interpreter_bf16_rounding() -> None:
    original = _interp._convert_float

    def convert(data: Any, src: Any, dst: Any, rounding_mode: Any) -> Any:
        if src == tl.float32 and dst == tl.bfloat16 and rounding_mode is None:
            arr = np.ascontiguousarray(data, dtype=np.float32)
            rounded = torch.from_numpy(arr).to(torch.bfloat16).view(torch.int16)
            return rounded.numpy().view(np.uint16)
        return original(data, src, dst, rounding_mode)

    _interp._convert_float = convert


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives NaN (which fails any <= check)."""
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def ulp_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| in ulps (machine epsilon) of max |ref|; NaN if any output is NaN."""
    scale = ref.double().abs().max() * torch.finfo(ref.dtype).eps
    return float((out.double() - ref.double()).abs().max() / scale)


def check(
    name: str,
    outs: tuple[torch.Tensor, ...],
    refs: tuple[torch.Tensor, ...],
    refs32: tuple[torch.Tensor, ...],
    seconds: float,
) -> None:
    dtype = outs[0].dtype
    ok = all(bool(torch.isfinite(o).all()) for o in outs)
    details = []
    for out, ref, ref32 in zip(outs, refs, refs32, strict=True):
        ok &= out.dtype == ref.dtype and out.shape == ref.shape and out.is_contiguous()
        rel, ulps = rel_err(out, ref32), ulp_err(out, ref)
        exact = float((out == ref).float().mean())
        ok &= rel <= REL_TOL[dtype] and ulps <= ULPS[dtype]
        details.append(f"rel_err={rel:.1e} ulps={ulps:.2f} exact={exact:.4f}")
    report(name, ok, " | ".join(details) + f" ({seconds:.2f}s)")


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full(t.shape, float("nan"), dtype=t.dtype)


def rand(gen: torch.Generator, *shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def norm_weight(gen: torch.Generator, size: int, dtype: torch.dtype) -> torch.Tensor:
    return (1.0 + 0.2 * torch.randn(size, generator=gen)).to(dtype)


def rope_tables(
    gen: torch.Generator, tokens: int, head_dim: int, theta: float = 1e6
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [tokens, head_dim] float32 in HF layout at random positions."""
    positions = torch.randint(0, 40000, (tokens,), generator=gen).float()
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    res = fn()
    return res, time.perf_counter() - t0


# --- cases ---------------------------------------------------------------------------------------


def run_rows(gen: torch.Generator) -> None:
    """rms_norm and add_rms_norm: H 1024 (Qwen3-0.6B) and awkward sizes, 1-D to 3-D inputs."""
    eps = 1e-6
    # (leading shape, H, dtype, strided input)
    cases = [
        ((256,), 1024, F32, False),
        ((7,), 1024, F16, False),
        ((1,), 1024, BF16, False),
        ((256,), 1024, BF16, False),
        ((2, 3), 1000, F32, True),  # H not a power of 2, rows from a column slice
        ((5,), 64, F16, True),
        ((3,), 4096, BF16, False),
        ((), 256, F32, False),  # a single 1-D row
    ]
    for lead, h, dtype, strided in cases:
        x = rand(gen, *lead, h, dtype=dtype, scale=3.0)
        res = rand(gen, *lead, h, dtype=dtype)
        if strided:  # [..., H] views with a row stride of H + 40
            x = rand(gen, *lead, h + 40, dtype=dtype, scale=3.0)[..., 20 : 20 + h]
        w = norm_weight(gen, h, dtype)
        tag = f"lead={lead} H={h} {dtype} strided={strided}"

        out, secs = timed(lambda x=x, w=w: ft.rms_norm(x, w, eps, out=nan_like(x)))
        ref = fused_ops.rms_norm_reference(x, w, eps)
        ref32 = fused_ops.rms_norm_reference(x.float(), w.float(), eps)
        check(f"rms_norm {tag}", (out,), (ref,), (ref32,), secs)

        (out, new_res), secs = timed(
            lambda x=x, res=res, w=w: ft.add_rms_norm(
                x, res, w, eps, out=nan_like(x), residual_out=nan_like(x)
            )
        )
        ref, ref_res = fused_ops.add_rms_norm_reference(x, res, w, eps)
        ref32 = fused_ops.rms_norm_reference(ref_res.float(), w.float(), eps)
        check(f"add_rms_norm {tag}", (out, new_res), (ref, ref_res), (ref32, ref_res), secs)
        report(f"add_rms_norm residual exact {tag}", torch.equal(new_res, ref_res), "")

    # A float32 weight with a half input promotes the result to float32, as torch does.
    x, w = rand(gen, 4, 256, dtype=BF16), norm_weight(gen, 256, F32)
    out, secs = timed(lambda: ft.rms_norm(x, w, eps))
    ref = fused_ops.rms_norm_reference(x, w, eps)
    err = rel_err(out, ref)  # y is rounded to bf16 before the fp32 product: bf16-level agreement
    ok = out.dtype == F32 and err <= 4e-3
    report("rms_norm bf16 x, fp32 weight", ok, f"dtype={out.dtype} rel_err={err:.1e} ({secs:.2f}s)")

    # In place: out is x, residual_out is residual (each program reads its row before writing).
    x, res, w = (
        rand(gen, 9, 512, dtype=F16),
        rand(gen, 9, 512, dtype=F16),
        norm_weight(gen, 512, F16),
    )
    ref, ref_res = fused_ops.add_rms_norm_reference(x, res, w, eps)
    out, new_res = ft.add_rms_norm(x, res, w, eps, out=x, residual_out=res)
    ok = out is x and new_res is res and ulp_err(x, ref) <= ULPS[F16] and torch.equal(res, ref_res)
    report("add_rms_norm in place", ok, f"ulps={ulp_err(x, ref):.2f}")


def run_qk(gen: torch.Generator) -> None:
    """qk_norm_rope: Qwen3 shapes (16/8 heads, D 128 and 64) as views of a fused qkv projection."""
    # (T, Hq, Hkv, D, dtype, norm)
    cases = [
        (1, 16, 8, 128, F32, True),
        (7, 16, 8, 128, F16, True),
        (256, 16, 8, 128, BF16, True),
        (7, 16, 8, 64, BF16, True),
        (7, 16, 8, 64, F32, False),  # rotary only (Llama / Qwen2)
        (33, 16, 8, 128, F16, False),
        (5, 14, 2, 96, F32, True),  # heads and half-dim not powers of 2
        (5, 6, 6, 32, BF16, True),
    ]
    eps = 1e-6
    for t, hq, hkv, d, dtype, norm in cases:
        qkv = rand(gen, t, (hq + 2 * hkv) * d, dtype=dtype, scale=2.0)
        q = qkv[:, : hq * d].view(t, hq, d)  # strided: row stride (hq + 2 hkv) d
        k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
        cos, sin = rope_tables(gen, t, d)
        qw = norm_weight(gen, d, dtype) if norm else None
        kw = norm_weight(gen, d, dtype) if norm else None
        (q_out, k_out), secs = timed(
            lambda q=q, k=k, cos=cos, sin=sin, qw=qw, kw=kw: ft.qk_norm_rope(
                q, k, cos, sin, qw, kw, eps, q_out=nan_like(q), k_out=nan_like(k)
            )
        )
        refs = fused_ops.qk_norm_rope_reference(q, k, cos, sin, qw, kw, eps)
        up = lambda w: None if w is None else w.float()  # noqa: E731
        refs32 = fused_ops.qk_norm_rope_reference(
            q.float(), k.float(), cos, sin, up(qw), up(kw), eps
        )
        check(
            f"qk_norm_rope T={t} h={hq}/{hkv} D={d} {dtype} norm={norm}",
            (q_out, k_out),
            refs,
            refs32,
            secs,
        )

    # Contiguous inputs, fresh outputs, no k norm but a q norm; and T == 0.
    q, k = rand(gen, 3, 4, 64, dtype=F32), rand(gen, 3, 2, 64, dtype=F32)
    cos, sin = rope_tables(gen, 3, 64)
    qw = norm_weight(gen, 64, F32)
    outs = ft.qk_norm_rope(q, k, cos, sin, qw, None)
    refs = fused_ops.qk_norm_rope_reference(q, k, cos, sin, qw, None)
    check("qk_norm_rope q-norm only, contiguous", outs, refs, refs, 0.0)
    empty = ft.qk_norm_rope(q[:0], k[:0], cos[:0], sin[:0], qw, qw)
    report("qk_norm_rope T=0", empty[0].shape == (0, 4, 64) and empty[1].shape == (0, 2, 64), "")


def run_silu(gen: torch.Generator) -> None:
    """silu_and_mul: I 3072 (Qwen3-0.6B) as halves of a gate_up projection, and ragged sizes."""
    # (T, I, dtype, from a fused gate_up)
    cases = [
        (256, 3072, BF16, True),
        (7, 3072, F16, True),
        (1, 3072, F32, False),
        (5, 1000, BF16, False),  # I not a multiple of the block
        (3, 40, F32, True),
    ]
    for t, n, dtype, fused in cases:
        if fused:
            gate_up = rand(gen, t, 2 * n, dtype=dtype, scale=4.0)
            gate, up = gate_up[:, :n], gate_up[:, n:]
        else:
            gate, up = rand(gen, t, n, dtype=dtype, scale=4.0), rand(gen, t, n, dtype=dtype)
        out, secs = timed(
            lambda gate=gate, up=up: ft.silu_and_mul(gate, up, out=nan_like(gate.contiguous()))
        )
        ref = fused_ops.silu_and_mul_reference(gate, up)
        ref32 = fused_ops.silu_and_mul_reference(gate.float(), up.float())
        check(f"silu_and_mul T={t} I={n} {dtype} fused={fused}", (out,), (ref,), (ref32,), secs)


def run_dispatch(gen: torch.Generator) -> None:
    """ROLLOUT_ACCEL_FUSED=triton routes CPU tensors to the (interpreted) kernels."""
    os.environ[fused_ops.ENV_VAR] = "triton"
    reload_overrides()
    backend = fused_ops.fused_backend(torch.device("cpu"))
    report("dispatch forced triton", backend == "triton", f"backend={backend}")
    x, res, w = (
        rand(gen, 4, 128, dtype=F32),
        rand(gen, 4, 128, dtype=F32),
        norm_weight(gen, 128, F32),
    )
    same = torch.equal(fused_ops.rms_norm(x, w, 1e-6), ft.rms_norm(x, w, 1e-6))
    same &= all(
        torch.equal(a, b)
        for a, b in zip(
            fused_ops.add_rms_norm(x, res, w, 1e-6), ft.add_rms_norm(x, res, w, 1e-6), strict=True
        )
    )
    q, k = rand(gen, 3, 4, 32, dtype=F32), rand(gen, 3, 2, 32, dtype=F32)
    cos, sin = rope_tables(gen, 3, 32)
    same &= all(
        torch.equal(a, b)
        for a, b in zip(
            fused_ops.qk_norm_rope(q, k, cos, sin), ft.qk_norm_rope(q, k, cos, sin), strict=True
        )
    )
    same &= torch.equal(fused_ops.silu_and_mul(x, res), ft.silu_and_mul(x, res))
    report("dispatch calls the Triton kernels", same, "")
    # Rows past MAX_HIDDEN go to the reference even when Triton is forced.
    big = rand(gen, 1, ft.MAX_HIDDEN + 1, dtype=F32)
    wb = norm_weight(gen, ft.MAX_HIDDEN + 1, F32)
    ok = torch.equal(fused_ops.rms_norm(big, wb, 1e-6), fused_ops.rms_norm_reference(big, wb, 1e-6))
    report("dispatch long rows -> reference", ok, "")


def main(argv: list[str]) -> int:
    _fix_interpreter_bf16_rounding()
    runners = {"rows": run_rows, "qk": run_qk, "silu": run_silu, "dispatch": run_dispatch}
    which = argv[1:] or list(runners)
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    print(f"seed={gen.initial_seed()}")
    for name in which:
        runners[name](gen)
    print(f"{len(FAILURES)} failure(s)")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
