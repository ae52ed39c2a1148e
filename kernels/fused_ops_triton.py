"""Triton kernels for `fused_ops`: one launch per op, same rounding points as Hugging Face.

Every kernel is memory-bound and tiny at decode sizes (a 256 x 1024 bf16 activation is 512 KB), so
the aim is one launch where eager PyTorch issues several, with 16-byte loads per thread:
  * rows (RMSNorm, residual add + RMSNorm): one program per row, the whole row in registers;
  * qk_norm_rope: one program per token covering all q and k heads, cos/sin read once per token,
    each head loaded as two halves so rotate_half is a pair of register swaps;
  * silu_and_mul: a (token, column block) grid.

Rounding follows the reference exactly: statistics in float32; every intermediate that Hugging Face
materialises in the input dtype (normed x, cos/sin cast to x's dtype, x*cos, rotate_half(x)*sin,
silu(gate), x + residual) is rounded to that dtype here too, and each product or sum of two such
values is formed in float32 (exact for bf16/fp16 products) and rounded once, as torch does.

Kernels are built with fp fusion off (no mul+add contracted into FMA): a float32 x*cos +
rotate_half(x)*sin then rounds like torch's separate ops, and results do not change with Triton's
default (which flips in 3.10). They are memory-bound, so the extra instructions cost nothing.

Invariants: no host syncs, grids and outputs sized from shapes only (CUDA-graph capturable); row
offsets are int64; other strides are honoured, but the last dim must be contiguous (qk_norm_rope
and silu_and_mul raise otherwise; the row ops copy such an input first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Longest row the row kernels keep in registers (16 warps x 32 threads x 32 float32 values);
# `fused_ops` sends longer rows to the reference.
MAX_HIDDEN = 16384
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _num_warps(tile_elems: int, elem_bytes: int, max_warps: int) -> int:
    """Warps such that each thread moves about 16 bytes of a tile_elems load, within [1, max]."""
    threads = max(1, tile_elems * elem_bytes // 16)
    return max(1, min(max_warps, triton.next_power_of_2(threads) // 32))


def _check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _DTYPES:
        raise ValueError(f"{name}: unsupported dtype {t.dtype}")


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., H] as [rows, H] contiguous in H (a view whenever the leading dims flatten)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _out(
    name: str, out: torch.Tensor | None, shape: torch.Size, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """`out` checked to be contiguous of (shape, dtype), or a fresh tensor when None."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if out.shape != shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous {tuple(shape)} {dtype}, got {tuple(out.shape)} {out.dtype}"
        )
    return out


def _check_weight(weight: torch.Tensor, size: int) -> None:
    _check_dtype("weight", weight)
    if weight.dim() != 1 or weight.shape[0] != size or weight.stride(0) != 1:
        raise ValueError(f"weight must be contiguous of shape [{size}], got {tuple(weight.shape)}")


# --- RMSNorm and residual add + RMSNorm ----------------------------------------------------------


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_r,
    eps,
    H: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # torch's add: fp32, rounded once
        tl.store(res_out_ptr + row * H + cols, x, mask=mask)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / H
    y = (xf * tl.rsqrt(var + eps)).to(x.dtype)
    out = (w.to(tl.float32) * y.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * H + cols, out, mask=mask)


def _launch_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None,
    residual_out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    _check_dtype("x", x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dim, got {tuple(x.shape)}")
    h = x.shape[-1]
    if h > MAX_HIDDEN:
        raise ValueError(f"hidden size {h} > MAX_HIDDEN {MAX_HIDDEN}")
    _check_weight(weight, h)
    if weight.device != x.device:
        raise ValueError("weight and x must be on the same device")
    rows = _as_rows(x)
    out = _out("out", out, x.shape, torch.promote_types(x.dtype, weight.dtype), x.device)
    res_out = None
    res_rows = rows
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"residual {tuple(residual.shape)} {residual.dtype} must match x "
                f"{tuple(x.shape)} {x.dtype}"
            )
        res_rows = _as_rows(residual)
        res_out = _out("residual_out", residual_out, x.shape, x.dtype, x.device)
    if rows.shape[0] == 0:
        return out, res_out
    block_h = triton.next_power_of_2(h)
    _rms_norm_kernel[(rows.shape[0],)](
        rows,
        res_rows,
        weight,
        out,
        out if res_out is None else res_out,
        rows.stride(0),
        res_rows.stride(0),
        eps,
        H=h,
        BLOCK_H=block_h,
        HAS_RESIDUAL=residual is not None,
        num_warps=_num_warps(block_h, x.element_size(), 16),
        enable_fp_fusion=False,
    )
    return out, res_out


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """HF RMSNorm of x [..., H] with weight [H]; result dtype promote(x, weight), x's shape.

    `out` (contiguous) receives the result if given; it may be x itself when x is contiguous
    (each program reads its whole row before writing it).
    """
    return _launch_rms_norm(x, None, weight, eps, out, None)[0]


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one kernel; x and residual share shape/dtype.

    Given outputs must be contiguous; `residual_out` may be `residual` itself and `out` may be x
    (in place, as each program reads its rows before writing them).
    """
    out, res_out = _launch_rms_norm(x, residual, weight, eps, out, residual_out)
    assert res_out is not None
    return out, res_out


# --- per-head q/k RMSNorm + rotary ---------------------------------------------------------------


@triton.jit
def _norm_rope_heads(
    x_ptr,
    stride_h,
    out_ptr,
    w_ptr,
    c1,
    c2,
    s1,
    s2,
    eps,
    NUM_HEADS: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    HAS_NORM: tl.constexpr,
):
    """One token's heads [NUM_HEADS, 2*HALF]: optional RMSNorm over the head, then rotary.

    c1/c2/s1/s2 [1, BLOCK_HALF] are cos/sin halves already rounded to x's dtype (held in float32).
    """
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < NUM_HEADS) & (cols < HALF)
    ptrs = x_ptr + heads * stride_h + cols
    x1 = tl.load(ptrs, mask=mask, other=0.0)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    a1 = x1.to(tl.float32)
    a2 = x2.to(tl.float32)
    if HAS_NORM:
        var = (tl.sum(a1 * a1, axis=1) + tl.sum(a2 * a2, axis=1)) / (2 * HALF)
        inv = tl.rsqrt(var + eps)[:, None]
        w_mask = cols < HALF
        w1 = tl.load(w_ptr + cols, mask=w_mask, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + cols, mask=w_mask, other=0.0).to(tl.float32)
        a1 = (w1 * (a1 * inv).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        a2 = (w2 * (a2 * inv).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1); each product rounded to dtype.
    o1 = (a1 * c1).to(dtype).to(tl.float32) - (a2 * s1).to(dtype).to(tl.float32)
    o2 = (a2 * c2).to(dtype).to(tl.float32) + (a1 * s2).to(dtype).to(tl.float32)
    out_ptrs = out_ptr + heads * (2 * HALF) + cols
    tl.store(out_ptrs, o1.to(dtype), mask=mask)
    tl.store(out_ptrs + HALF, o2.to(dtype), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    q_w_ptr,
    k_w_ptr,
    q_out_ptr,
    k_out_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_ct,
    stride_st,
    eps,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr,
    BLOCK_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    Q_NORM: tl.constexpr,
    K_NORM: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    dtype = q_out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    c_mask = cols < HALF
    cos_row = cos_ptr + t * stride_ct + cols
    sin_row = sin_ptr + t * stride_st + cols
    # cos.to(x.dtype), sin.to(x.dtype) as HF does, then held in float32 for the products.
    c1 = tl.load(cos_row, mask=c_mask, other=0.0).to(dtype).to(tl.float32)
    c2 = tl.load(cos_row + HALF, mask=c_mask, other=0.0).to(dtype).to(tl.float32)
    s1 = tl.load(sin_row, mask=c_mask, other=0.0).to(dtype).to(tl.float32)
    s2 = tl.load(sin_row + HALF, mask=c_mask, other=0.0).to(dtype).to(tl.float32)
    _norm_rope_heads(
        q_ptr + t * stride_qt,
        stride_qh,
        q_out_ptr + t * (NUM_Q_HEADS * 2 * HALF),
        q_w_ptr,
        c1,
        c2,
        s1,
        s2,
        eps,
        NUM_Q_HEADS,
        BLOCK_Q_HEADS,
        HALF,
        BLOCK_HALF,
        Q_NORM,
    )
    _norm_rope_heads(
        k_ptr + t * stride_kt,
        stride_kh,
        k_out_ptr + t * (NUM_KV_HEADS * 2 * HALF),
        k_w_ptr,
        c1,
        c2,
        s1,
        s2,
        eps,
        NUM_KV_HEADS,
        BLOCK_KV_HEADS,
        HALF,
        BLOCK_HALF,
        K_NORM,
    )


def _check_heads(name: str, x: torch.Tensor) -> None:
    _check_dtype(name, x)
    if x.dim() != 3:
        raise ValueError(f"{name} must be [tokens, heads, head_dim], got {tuple(x.shape)}")
    if x.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in head_dim")


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    q_out: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm (when weights are given) + HF rotary of q [T, Hq, D] and k [T, Hkv, D].

    q/k may be any views contiguous in D (e.g. column slices of a fused qkv projection); cos/sin
    [T, D] float (HF layout), contiguous in D; weights [D] in q's dtype. Returns new contiguous
    (q_out, k_out) in q's dtype (or fills the given contiguous ones; q_out may be q itself when q
    is contiguous, likewise k), one launch.
    """
    _check_heads("q", q)
    _check_heads("k", k)
    tokens, num_q_heads, head_dim = q.shape
    if k.shape[0] != tokens or k.shape[2] != head_dim or k.dtype != q.dtype:
        raise ValueError(
            f"k {tuple(k.shape)} {k.dtype} does not match q {tuple(q.shape)} {q.dtype}"
        )
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary, got {head_dim}")
    for name, t in (("cos", cos), ("sin", sin)):
        _check_dtype(name, t)
        if t.shape != (tokens, head_dim) or t.stride(-1) != 1:
            raise ValueError(f"{name} must be [{tokens}, {head_dim}] contiguous in its last dim")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w is not None:
            _check_weight(w, head_dim)
            if w.dtype != q.dtype:
                raise ValueError(f"{name} dtype {w.dtype} must match q dtype {q.dtype}")
    q_out = _out("q_out", q_out, q.shape, q.dtype, q.device)
    k_out = _out("k_out", k_out, k.shape, k.dtype, k.device)
    if tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_q = triton.next_power_of_2(num_q_heads)
    block_kv = triton.next_power_of_2(k.shape[1])
    _qk_norm_rope_kernel[(tokens,)](
        q,
        k,
        cos,
        sin,
        q_out if q_weight is None else q_weight,  # unused pointer when there is no norm
        k_out if k_weight is None else k_weight,
        q_out,
        k_out,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        sin.stride(0),
        eps,
        NUM_Q_HEADS=num_q_heads,
        NUM_KV_HEADS=k.shape[1],
        BLOCK_Q_HEADS=block_q,
        BLOCK_KV_HEADS=block_kv,
        HALF=half,
        BLOCK_HALF=block_half,
        Q_NORM=q_weight is not None,
        K_NORM=k_weight is not None,
        num_warps=_num_warps(block_q * block_half, q.element_size(), 8),
        enable_fp_fusion=False,
    )
    return q_out, k_out


# --- SiLU and mul --------------------------------------------------------------------------------

SILU_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(
    gate_ptr,
    up_ptr,
    out_ptr,
    stride_g,
    stride_u,
    n_cols,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(gate_ptr + t * stride_g + cols, mask=mask, other=0.0)
    u = tl.load(up_ptr + t * stride_u + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # F.silu in float32, rounded to the dtype
    out = (act.to(tl.float32) * u.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + t * n_cols + cols, out, mask=mask)


def silu_and_mul(
    gate: torch.Tensor, up: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """silu(gate) * up, gate/up [T, I] of one dtype, contiguous in I (row strides honoured).

    `out` (contiguous [T, I]) receives the result if given.
    """
    _check_dtype("gate", gate)
    if gate.dim() != 2 or up.shape != gate.shape or up.dtype != gate.dtype:
        raise ValueError(
            f"gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
            "must be 2-D of one shape and dtype"
        )
    if gate.stride(-1) != 1 or up.stride(-1) != 1:
        raise ValueError("gate and up must be contiguous in their last dim")
    tokens, n_cols = gate.shape
    out = _out("out", out, gate.shape, gate.dtype, gate.device)
    if tokens == 0 or n_cols == 0:
        return out
    block = min(SILU_BLOCK, triton.next_power_of_2(n_cols))
    _silu_and_mul_kernel[(tokens, triton.cdiv(n_cols, block))](
        gate,
        up,
        out,
        gate.stride(0),
        up.stride(0),
        n_cols,
        BLOCK=block,
        num_warps=_num_warps(block, gate.element_size(), 8),
        enable_fp_fusion=False,
    )
    return out
