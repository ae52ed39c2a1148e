"""Triton attention over the paged KV cache of `paged_attention_reference` (same layout, same math).

Decode (one new token per sequence) is memory-bound: each program owns one (sequence, kv head,
KV chunk) and handles every q head of that kv group, so each K/V tile is read from memory once.
When batch * kv_heads programs cannot fill the GPU, the KV range of each sequence is cut into
`num_splits` chunks (flash-decoding) and a second kernel merges the partial results by their
log-sum-exp. Prefill is a flash-attention kernel that gathers K/V through the block table, causal
within the new tokens and fully visible over the cached prefix.

Invariants the engine relies on:
  * Decode launches no host syncs and sizes its grid and workspace from static shapes only, so it
    can be captured in a CUDA graph; prefill is capturable when `max_q_len` is given.
  * Accumulation is float32 whatever the input dtype; float32 inputs use exact (IEEE) products.
  * A decode row with seq_len == 0 (CUDA-graph padding) writes zeros instead of NaN.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634

# Most KV chunks per sequence in split decode. 64 chunks of a 32k context are 512 tokens each,
# enough to amortise the merge; more would only add workspace traffic.
MAX_NUM_SPLITS = 64


@dataclass(frozen=True, slots=True)
class DecodeConfig:
    """Launch parameters of the decode kernel (tile of BLOCK_N tokens per loop step)."""

    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True, slots=True)
class PrefillConfig:
    """Launch parameters of the prefill kernel (BLOCK_M queries x BLOCK_N keys per step)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def default_decode_config(head_dim: int, dtype: torch.dtype) -> DecodeConfig:
    """Hopper starting point: 64-token tiles keep 32 KB of K+V in flight per stage at bf16/d128.

    Checked by compiling for sm_90: no register spills at head_dim 64/96/128, bf16/fp16/fp32.
    """
    if dtype == torch.float32:  # IEEE fp32 products run on FMA units; 8 warps avoid spills
        return DecodeConfig(block_n=32, num_warps=8, num_stages=2)
    if head_dim > 128:
        return DecodeConfig(block_n=32, num_warps=4, num_stages=2)
    return DecodeConfig(block_n=64, num_warps=4, num_stages=3)


def default_prefill_config(head_dim: int, dtype: torch.dtype) -> PrefillConfig:
    """Hopper starting point: 128x64 tiles (wgmma), three stages fit shared memory at bf16/d128."""
    if dtype == torch.float32:  # test path; larger fp32 tiles spill registers
        return PrefillConfig(block_m=32, block_n=16, num_warps=8, num_stages=2)
    if head_dim > 128:
        return PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    if head_dim <= 64:
        return PrefillConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)
    return PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # CPU tensors only run under TRITON_INTERPRET; any small number will do.
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_num_splits(
    batch: int, num_kv_heads: int, max_context: int, block_n: int, device: torch.device
) -> int:
    """KV chunks per sequence from static shapes only (CUDA-graph safe).

    Aims for about two programs per SM, with at least four tiles per chunk at `max_context` (the
    longest sequence the block table can describe) and at most MAX_NUM_SPLITS chunks.
    """
    programs = batch * num_kv_heads
    sms = _sm_count(device)
    if programs >= sms:
        return 1
    splits = -(-2 * sms // programs)
    splits = min(splits, MAX_NUM_SPLITS, max(1, -(-max_context // (4 * block_n))))
    return max(1, splits)


def _dot_precision(dtype: torch.dtype) -> str:
    # tf32 would cost float32 inputs ~3e-4 relative error; they exist for testing, so be exact.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_common(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor
) -> tuple[int, int, int]:
    if q.dim() != 3 or k_cache.dim() != 3 or v_cache.dim() != 3:
        raise ValueError("q, k_cache, v_cache must be 3-D ([tokens|slots, heads, head_dim])")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} != v_cache {tuple(v_cache.shape)}")
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[1]
    if k_cache.shape[2] != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) != head_dim of KV ({k_cache.shape[2]})")
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of {num_kv_heads}")
    if q.dtype != k_cache.dtype or q.dtype != v_cache.dtype:
        raise ValueError(f"dtype mismatch: q {q.dtype}, k {k_cache.dtype}, v {v_cache.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported dtype {q.dtype}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim")
    if block_table.dim() != 2 or block_table.stride(-1) != 1:
        raise ValueError("block_table must be 2-D and contiguous in its last dim")
    if block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_table must be int32 or int64, got {block_table.dtype}")
    return num_q_heads, num_kv_heads, head_dim


def _check_lengths(name: str, lengths: torch.Tensor, size: int, page_size: int) -> None:
    if lengths.dim() != 1 or lengths.shape[0] != size:
        raise ValueError(f"{name} must have shape [{size}], got {tuple(lengths.shape)}")
    if lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {lengths.dtype}")
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")


def _check_out(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError("out must match q in shape and dtype and be contiguous in head_dim")
    return out


# ---------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    block_table_ptr,
    seq_lens_ptr,
    out_ptr,
    mid_o_ptr,
    mid_lse_ptr,
    qk_scale,
    num_splits,
    stride_qb,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_bt,
    stride_ob,
    stride_oh,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_lb,
    stride_lh,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
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

    seq_len = tl.load(seq_lens_ptr + b)
    # Chunks are cut per sequence (not from the static max length) so short sequences in a long
    # block table still spread over all chunks; tile-aligned so only the last tile is partial.
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < GROUP
    heads = kvh * GROUP + offs_h
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    hd_mask = h_mask[:, None] & d_mask[None, :]

    # BLOCK_H >= 16 rows (padding heads of small groups) so the products run on tensor cores.
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=hd_mask,
        other=0.0,
    )
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)

    bt_row = block_table_ptr + b.to(tl.int64) * stride_bt
    k_head = k_ptr + kvh.to(tl.int64) * stride_kh
    v_head = v_ptr + kvh.to(tl.int64) * stride_vh
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        n_mask = pos < end
        page = tl.load(bt_row + pos // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
        slot = page * PAGE_SIZE + pos % PAGE_SIZE  # int64: pools beyond 2**31 elements
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_head + slot[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile has a valid position
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + slot[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if DIRECT:
        o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=hd_mask)
    else:
        mid_ptrs = (
            mid_o_ptr
            + b * stride_mb
            + heads[:, None] * stride_mh
            + split * stride_ms
            + offs_d[None, :]
        )
        tl.store(mid_ptrs, o, mask=hd_mask)
        # Log2-domain LSE; -inf marks a chunk past the end of the sequence.
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(mid_lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=h_mask)


@triton.jit
def _decode_merge_kernel(
    mid_o_ptr,
    mid_lse_ptr,
    out_ptr,
    num_splits,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(
        mid_lse_ptr + b * stride_lb + h * stride_lh + offs_s,
        mask=offs_s < num_splits,
        other=float("-inf"),
    )
    used = lse > float("-inf")
    m = tl.max(lse, 0)
    m = tl.where(m > float("-inf"), m, 0.0)
    w = tl.where(used, tl.exp2(lse - m), 0.0)
    o = tl.load(
        mid_o_ptr + b * stride_mb + h * stride_mh + offs_s[:, None] * stride_ms + offs_d[None, :],
        mask=used[:, None] & d_mask[None, :],
        other=0.0,
    )
    total = tl.sum(w, 0)
    res = tl.sum(o * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(
        out_ptr + b * stride_ob + h * stride_oh + offs_d,
        res.to(out_ptr.dtype.element_ty),
        mask=d_mask,
    )


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    num_splits: int | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence over its paged KV. q: [batch, Hq, D] -> same.

    `seq_lens` counts the cached tokens including the new one (its K/V already written). The grid
    and the float32 split workspace depend only on shapes and `num_splits` (default: from
    `default_num_splits`), so the call is CUDA-graph capturable.
    """
    num_q_heads, num_kv_heads, head_dim = _check_common(q, k_cache, v_cache, block_table)
    batch = q.shape[0]
    out = _check_out(out, q)
    _check_lengths("seq_lens", seq_lens, batch, page_size)
    if block_table.shape[0] < batch:
        raise ValueError(f"block_table has {block_table.shape[0]} rows for batch {batch}")
    if batch == 0:
        return out
    cfg = config or default_decode_config(head_dim, q.dtype)
    if num_splits is None:
        max_context = block_table.shape[1] * page_size
        num_splits = default_num_splits(batch, num_kv_heads, max_context, cfg.block_n, q.device)
    if not 1 <= num_splits <= 1024:
        raise ValueError(f"num_splits must be in [1, 1024], got {num_splits}")
    group = num_q_heads // num_kv_heads
    block_h = max(16, triton.next_power_of_2(group))
    block_d = max(16, triton.next_power_of_2(head_dim))
    direct = num_splits == 1
    mid_o, mid_lse, mid_strides = split_workspace(out, batch, num_splits, lse_fill=None)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_table,
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
        GROUP=group,
        BLOCK_H=block_h,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_N=cfg.block_n,
        PAGE_SIZE=page_size,
        DIRECT=direct,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if not direct:
        merge_splits(mid_o, mid_lse, out, num_splits, mid_strides)
    return out


def split_workspace(
    out: torch.Tensor, rows: int, num_splits: int, lse_fill: float | None
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Per-split partial outputs [rows, Hq, S, D] and log-sum-exps [rows, Hq, S] (float32) for
    a split-KV launch, and their strides as the split kernels take them. One split writes `out`
    directly: then both are `out` (unused; any tensor gives valid strides) and strides are 0.
    `lse_fill`: an initial value for the lse (e.g. -inf where some rows may go unwritten)."""
    if num_splits == 1:
        return out, out, (0, 0, 0, 0, 0)
    heads, head_dim = out.shape[1], out.shape[2]
    mid_o = torch.empty((rows, heads, num_splits, head_dim), dtype=torch.float32, device=out.device)
    shape = (rows, heads, num_splits)
    if lse_fill is None:
        mid_lse = torch.empty(shape, dtype=torch.float32, device=out.device)
    else:
        mid_lse = torch.full(shape, lse_fill, dtype=torch.float32, device=out.device)
    strides = (
        mid_o.stride(0),
        mid_o.stride(1),
        mid_o.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
    )
    return mid_o, mid_lse, strides


def merge_splits(
    mid_o: torch.Tensor,
    mid_lse: torch.Tensor,
    out: torch.Tensor,
    num_splits: int,
    strides: tuple[int, ...],
) -> None:
    """Combines the splits of `split_workspace` into `out`: one program per (row, q head)."""
    rows, heads, head_dim = mid_o.shape[0], mid_o.shape[1], mid_o.shape[3]
    block_d = max(16, triton.next_power_of_2(head_dim))
    _decode_merge_kernel[(rows, heads)](
        mid_o,
        mid_lse,
        out,
        num_splits,
        *strides,
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
        num_warps=4 if block_d >= 128 else 2,
    )


# ---------------------------------------------------------------------------------------------
# Prefill
# ---------------------------------------------------------------------------------------------


@triton.jit
def _prefill_tile(
    q,
    m_i,
    l_i,
    acc,
    n0,
    n_end,
    q_pos,
    bt_row,
    k_head,
    v_head,
    stride_kt,
    stride_vt,
    qk_scale,
    offs_d,
    d_mask,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pos = n0 + tl.arange(0, BLOCK_N)
    page = tl.load(bt_row + pos // PAGE_SIZE, mask=pos < n_end, other=0).to(tl.int64)
    slot = page * PAGE_SIZE + pos % PAGE_SIZE
    if CAUSAL:
        kv_mask = (pos < n_end)[:, None] & d_mask[None, :]
    else:
        kv_mask = d_mask[None, :]
    k = tl.load(k_head + slot[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if CAUSAL:
        visible = (pos[None, :] <= q_pos[:, None]) & (pos < n_end)[None, :]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that sees nothing yet keeps m = -inf; pin its reference to 0 so exp2 gives 0, not NaN.
    m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_head + slot[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    block_table_ptr,
    cu_q_lens_ptr,
    seq_lens_ptr,
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
    # Later query blocks see the longest causal range: launch them first to shorten the tail.
    m_blk = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)

    q_start = tl.load(cu_q_lens_ptr + b)
    q_len = tl.load(cu_q_lens_ptr + b + 1) - q_start
    if m_blk * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    prefix = seq_len - q_len

    offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < q_len
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    q_pos = prefix + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    kvh = h // GROUP
    bt_row = block_table_ptr + b.to(tl.int64) * stride_bt
    k_head = k_ptr + kvh.to(tl.int64) * stride_kh
    v_head = v_ptr + kvh.to(tl.int64) * stride_vh

    # Keys before the block's first query position are visible to all its rows: whole tiles of
    # them need neither the causal nor the bounds mask. The rest (at most BLOCK_M + BLOCK_N keys)
    # goes through the masked path.
    full_end = prefix + m_blk * BLOCK_M
    full_tiles_end = (full_end // BLOCK_N) * BLOCK_N
    causal_end = tl.minimum(seq_len, prefix + (m_blk + 1) * BLOCK_M)
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
    for n0 in range(full_tiles_end, causal_end, BLOCK_N):
        m_i, l_i, acc = _prefill_tile(
            q,
            m_i,
            l_i,
            acc,
            n0,
            causal_end,
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


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_q_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    scale: float,
    max_q_len: int | None = None,
    out: torch.Tensor | None = None,
    *,
    config: PrefillConfig | None = None,
) -> torch.Tensor:
    """Attention of packed new tokens over their paged KV. q: [total_q, Hq, D] -> same.

    Sequence b's new tokens are q[cu_q_lens[b]:cu_q_lens[b + 1]], its last positions out of
    seq_lens[b]; they attend causally to each other and to the whole cached prefix. The grid needs
    the longest q_len: pass `max_q_len` to avoid a host sync (and to capture in a CUDA graph).
    """
    num_q_heads, num_kv_heads, head_dim = _check_common(q, k_cache, v_cache, block_table)
    out = _check_out(out, q)
    batch = seq_lens.shape[0]
    _check_lengths("seq_lens", seq_lens, batch, page_size)
    _check_lengths("cu_q_lens", cu_q_lens, batch + 1, page_size)
    if block_table.shape[0] < batch:
        raise ValueError(f"block_table has {block_table.shape[0]} rows for batch {batch}")
    if q.shape[0] == 0 or batch == 0:
        return out
    if max_q_len is None:
        max_q_len = int((cu_q_lens[1:] - cu_q_lens[:-1]).max().item())
    if max_q_len <= 0:
        return out
    cfg = config or default_prefill_config(head_dim, q.dtype)
    block_d = max(16, triton.next_power_of_2(head_dim))
    grid = (triton.cdiv(max_q_len, cfg.block_m), num_q_heads, batch)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_table,
        cu_q_lens,
        seq_lens,
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
        GROUP=num_q_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        PAGE_SIZE=page_size,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out
