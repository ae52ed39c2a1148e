"""Triton attention of queries at arbitrary positions over the paged KV cache.

Same function as `selective_attention.selective_attention_reference`. A flash-attention kernel:
one program per (block of BLOCK_M queries of one sequence, q head). Since positions ascend within
a sequence, a block's first query bounds the keys every row sees (whole tiles below it run
unmasked) and its last query bounds the keys any row sees (the loop stops there); the tiles in
between take the per-row causal mask. Accumulation is float32; float32 inputs use IEEE products.
No host syncs when `max_q_len` is given.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The prefill kernel's tile: the same online-softmax step over one KV tile (unmasked below the
# block's first query, causally masked above it).
from .paged_attention_triton import _prefill_tile

_LOG2E = 1.4426950408889634


def _config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    if dtype == torch.float32:
        return 32, 16, 8, 2
    if head_dim > 128:
        return 64, 32, 4, 2
    return 64, 64, 4, 3


@triton.jit
def _selective_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    block_table_ptr,
    cu_q_lens_ptr,
    q_pos_ptr,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_bt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    m_blk = tl.num_programs(0) - 1 - tl.program_id(0)  # long-range blocks first
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(cu_q_lens_ptr + b)
    q_len = tl.load(cu_q_lens_ptr + b + 1) - q_start
    if m_blk * BLOCK_M >= q_len:
        return
    offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < q_len
    rows = (q_start + offs_m).to(tl.int64)
    q_pos = tl.load(q_pos_ptr + rows, mask=m_mask, other=-1).to(tl.int32)
    first_pos = tl.load(q_pos_ptr + q_start + m_blk * BLOCK_M).to(tl.int32)
    last_row = tl.minimum((m_blk + 1) * BLOCK_M, q_len) - 1
    last_pos = tl.load(q_pos_ptr + q_start + last_row).to(tl.int32)

    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    kvh = h // GROUP
    bt_row = block_table_ptr + b.to(tl.int64) * stride_bt
    k_head = k_ptr + kvh.to(tl.int64) * stride_kh
    v_head = v_ptr + kvh.to(tl.int64) * stride_vh

    full_tiles_end = ((first_pos + 1) // BLOCK_N) * BLOCK_N
    end = last_pos + 1
    for n0 in range(0, full_tiles_end, BLOCK_N):
        m_i, l_i, acc = _prefill_tile(
            q,
            m_i,
            l_i,
            acc,
            n0,
            full_tiles_end,
            q_pos,
            bt_row,
            k_head,
            v_head,
            stride_kt,
            stride_vt,
            qk_scale,
            offs_d,
            d_mask,
            BLOCK_N=BLOCK_N,
            PAGE_SIZE=PAGE_SIZE,
            CAUSAL=False,
            DOT_PRECISION=DOT_PRECISION,
        )
    for n0 in range(full_tiles_end, end, BLOCK_N):
        m_i, l_i, acc = _prefill_tile(
            q,
            m_i,
            l_i,
            acc,
            n0,
            end,
            q_pos,
            bt_row,
            k_head,
            v_head,
            stride_kt,
            stride_vt,
            qk_scale,
            offs_d,
            d_mask,
            BLOCK_N=BLOCK_N,
            PAGE_SIZE=PAGE_SIZE,
            CAUSAL=True,
            DOT_PRECISION=DOT_PRECISION,
        )
    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


def selective_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_q_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    q_positions: torch.Tensor,
    page_size: int,
    scale: float,
    max_q_len: int | None = None,
) -> torch.Tensor:
    """q [total_q, Hq, D] -> [total_q, Hq, D]; arguments as in the reference."""
    if q.dtype != k_cache.dtype or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"dtype mismatch: q {q.dtype}, k {k_cache.dtype}, v {v_cache.dtype}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim")
    out = torch.empty_like(q)
    batch = seq_lens.shape[0]
    if q.shape[0] == 0 or batch == 0:
        return out
    if max_q_len is None:
        max_q_len = int((cu_q_lens[1:] - cu_q_lens[:-1]).max().item())
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    block_m, block_n, warps, stages = _config(head_dim, q.dtype)
    grid = (triton.cdiv(max_q_len, block_m), num_q_heads, batch)
    _selective_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_table,
        cu_q_lens,
        q_positions,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        out.stride(0),
        out.stride(1),
        block_table.stride(0),
        GROUP=num_q_heads // k_cache.shape[1],
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        PAGE_SIZE=page_size,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=warps,
        num_stages=stages,
    )
    return out
