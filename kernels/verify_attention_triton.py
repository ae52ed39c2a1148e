"""Triton attention of speculative-verify rows over the paged KV (layout and math of
`verify_attention_reference`).

Verification is decode with a few extra queries per row, so it stays memory-bound: like the decode
kernel, each program owns one (row, kv head, KV chunk) and holds *all* Q * GROUP queries of that
kv head as one tile (q_len <= 8 positions times the GQA group: 16 rows for Qwen3's 2:1 group at
q_len 8), so each K/V tile is read once for every query that needs it. The prefill kernel would read
it once per q head and spend a 128-row tile on 8 queries. Rows are split into KV chunks
(flash-decoding) when the batch cannot fill the GPU, and the decode merge kernel combines them.

Invariants: no host syncs; grid and workspace depend only on shapes, `max_q_len` and
`num_splits`, so the call is CUDA-graph capturable. Float32 accumulation; float32 inputs use IEEE
products. Query rows that belong to no row (padding of a fixed-stride layout) are not written by
the direct path and are zeros after a split merge.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged_attention_triton import (
    DecodeConfig,
    _check_common,
    _check_out,
    _dot_precision,
    default_decode_config,
    default_num_splits,
    merge_splits,
    split_workspace,
)

_LOG2E = 1.4426950408889634
MAX_Q_LEN = 16  # queries per row; verification drafts a handful of tokens


@triton.jit
def _verify_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    block_table_ptr,
    cu_q_lens_ptr,
    seq_lens_ptr,
    out_ptr,
    mid_o_ptr,
    mid_lse_ptr,
    qk_scale,
    num_splits,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_bt,
    stride_ot,
    stride_oh,
    stride_mt,
    stride_mh,
    stride_ms,
    stride_lt,
    stride_lh,
    MAX_Q: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    DIRECT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    q_start = tl.load(cu_q_lens_ptr + b)
    q_len = tl.load(cu_q_lens_ptr + b + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + b)
    prefix = seq_len - q_len
    # Chunks cut per row, tile-aligned, as in decode.
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    # Tile row r is query slot r // GROUP, q head kvh * GROUP + r % GROUP.
    offs_r = tl.arange(0, BLOCK_R)
    qi = offs_r // GROUP
    heads = kvh * GROUP + offs_r % GROUP
    r_mask = (offs_r < MAX_Q * GROUP) & (qi < q_len)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    rd_mask = r_mask[:, None] & d_mask[None, :]
    tokens = (q_start + qi).to(tl.int64)
    q = tl.load(
        q_ptr + tokens[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=rd_mask,
        other=0.0,
    )
    q_pos = prefix + qi

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)

    bt_row = block_table_ptr + b.to(tl.int64) * stride_bt
    k_head = k_ptr + kvh.to(tl.int64) * stride_kh
    v_head = v_ptr + kvh.to(tl.int64) * stride_vh
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        n_mask = pos < end
        page = tl.load(bt_row + pos // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
        slot = page * PAGE_SIZE + pos % PAGE_SIZE
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_head + slot[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = n_mask[None, :] & (pos[None, :] <= q_pos[:, None]) & r_mask[:, None]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen nothing yet (its causal limit lies before this tile, or padding)
        # keeps m = -inf; pin its reference to 0 so exp2 gives 0, not NaN.
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + slot[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    # Only the row's own queries are written: rows are packed, a padding slot of one row is
    # another row's query.
    store_mask = r_mask[:, None] & d_mask[None, :]
    if DIRECT:
        o_ptrs = out_ptr + tokens[:, None] * stride_ot + heads[:, None] * stride_oh
        tl.store(o_ptrs + offs_d[None, :], o.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        mid_ptrs = (
            mid_o_ptr
            + tokens[:, None] * stride_mt
            + heads[:, None] * stride_mh
            + split * stride_ms
            + offs_d[None, :]
        )
        tl.store(mid_ptrs, o, mask=store_mask)
        # -inf marks "nothing here": a chunk past the row's end or the query's causal limit.
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(mid_lse_ptr + tokens * stride_lt + heads * stride_lh + split, lse, mask=r_mask)


def paged_verify_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_q_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    scale: float,
    max_q_len: int,
    out: torch.Tensor | None = None,
    *,
    num_splits: int | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """Attention of verify rows (q_len <= max_q_len each, packed by `cu_q_lens`) over their
    paged KV: q [total_q, Hq, D] -> same. See `verify_attention_reference` for the layout.
    Query rows outside every row's range are left untouched."""
    num_q_heads, num_kv_heads, head_dim = _check_common(q, k_cache, v_cache, block_table)
    out = _check_out(out, q)
    batch = seq_lens.shape[0]
    if not 1 <= max_q_len <= MAX_Q_LEN:
        raise ValueError(f"max_q_len must be in [1, {MAX_Q_LEN}], got {max_q_len}")
    for name, t, size in (("cu_q_lens", cu_q_lens, batch + 1), ("seq_lens", seq_lens, batch)):
        if t.dim() != 1 or t.shape[0] != size or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32/int64 of shape [{size}]")
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    if block_table.shape[0] < batch:
        raise ValueError(f"block_table has {block_table.shape[0]} rows for batch {batch}")
    total = q.shape[0]
    if batch == 0 or total == 0:
        return out
    cfg = config or default_decode_config(head_dim, q.dtype)
    if num_splits is None:
        max_context = block_table.shape[1] * page_size
        num_splits = default_num_splits(batch, num_kv_heads, max_context, cfg.block_n, q.device)
    if not 1 <= num_splits <= 1024:
        raise ValueError(f"num_splits must be in [1, 1024], got {num_splits}")
    group = num_q_heads // num_kv_heads
    block_r = max(16, triton.next_power_of_2(max_q_len * group))
    block_d = max(16, triton.next_power_of_2(head_dim))
    direct = num_splits == 1
    # -inf lse everywhere first: query rows no program owns (padding) merge to zeros.
    mid_o, mid_lse, mid_strides = split_workspace(out, total, num_splits, lse_fill=float("-inf"))
    _verify_split_kernel[(batch, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_table,
        cu_q_lens,
        seq_lens,
        out,
        mid_o,
        mid_lse,
        scale * _LOG2E,
        num_splits,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        block_table.stride(0),
        out.stride(0),
        out.stride(1),
        *mid_strides,
        MAX_Q=max_q_len,
        GROUP=group,
        BLOCK_R=block_r,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_N=cfg.block_n,
        PAGE_SIZE=page_size,
        DIRECT=direct,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if not direct:  # one merge program per (query token, q head)
        merge_splits(mid_o, mid_lse, out, num_splits, mid_strides)
    return out
