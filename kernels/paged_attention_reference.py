"""Plain-PyTorch attention over a paged KV cache: the CPU path and the oracle for Triton kernels.

KV layout (shared by the engine and every kernel):
  k_cache, v_cache: [num_slots, num_kv_heads, head_dim], num_slots = num_pages * page_size.
  block_table:      [batch, max_pages] int32; page p of sequence b holds its tokens
                    [p * page_size, (p + 1) * page_size); token t lives in slot
                    block_table[b, t // page_size] * page_size + t % page_size.
  seq_lens:         [batch] int32, tokens of each sequence in the cache *including* the new ones.
  q:                [total_q, num_q_heads, head_dim], the new tokens of every sequence packed in
                    order; cu_q_lens [batch + 1] int32 are their offsets. The new tokens of sequence b
                    are its last q_len positions, and attend causally to everything before them.
Grouped-query attention: q head h reads kv head h // (num_q_heads // num_kv_heads).
"""

from __future__ import annotations

import torch


def token_slots(
    block_table: torch.Tensor, seq_len: int, page_size: int, row: int = 0
) -> torch.Tensor:
    """Slot index of each of the first `seq_len` tokens of sequence `row`."""
    positions = torch.arange(seq_len, device=block_table.device)
    pages = block_table[row, positions // page_size].long()
    return pages * page_size + positions % page_size


def paged_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    scale: float,
) -> torch.Tensor:
    """One new token per sequence. q: [batch, num_q_heads, head_dim] -> same shape.

    Vectorised over the batch: keys are gathered into a padded [batch, max_len] block and masked,
    which on the CPU beats a Python loop of small products by a wide margin.
    """
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    max_len = int(seq_lens.max().item())
    positions = torch.arange(max_len, device=q.device)
    pages = block_table[:, : (max_len + page_size - 1) // page_size].long()
    slots = pages[:, positions // page_size] * page_size + positions % page_size  # [B, L]
    valid = positions[None, :] < seq_lens[:, None].long()
    flat = slots.masked_fill(~valid, 0).flatten()
    # [B, Hkv, L, D]: one gather per cache, then batched matmuls per kv head group.
    keys = (
        k_cache.index_select(0, flat).view(batch, max_len, num_kv_heads, head_dim).transpose(1, 2)
    )
    values = (
        v_cache.index_select(0, flat).view(batch, max_len, num_kv_heads, head_dim).transpose(1, 2)
    )
    # Masked positions read slot 0 (reserved, never a real token's): whatever it holds must not
    # reach the output, and 0 * NaN is NaN, so masked values are zeroed, not only weighted 0.
    values = values.masked_fill(~valid[:, None, :, None], 0.0)
    qg = q.view(batch, num_kv_heads, group, head_dim).float()
    scores = torch.matmul(qg, keys.float().transpose(-1, -2)) * scale  # [B, Hkv, G, L]
    scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
    # A row with seq_len 0 (graph padding) attends to nothing: zeros, as the Triton kernel writes.
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.matmul(probs, values.float())
    return out.reshape(batch, num_q_heads, head_dim).to(q.dtype)


def paged_prefill_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_q_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    scale: float,
) -> torch.Tensor:
    """Several new tokens per sequence (prefill, chunked prefill, or decode as q_len == 1).

    q: [total_q, num_q_heads, head_dim] -> same shape. Causal within the new tokens; every cached
    token before them is visible.
    """
    out = torch.zeros_like(q)  # rows outside every sequence (graph padding) stay zero
    num_q_heads = q.shape[1]
    num_kv_heads = k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    cu = cu_q_lens.tolist()
    lens = seq_lens.tolist()
    for row in range(len(lens)):
        start, end = cu[row], cu[row + 1]
        q_len, seq_len = end - start, lens[row]
        if q_len == 0:
            continue
        slots = token_slots(block_table, seq_len, page_size, row)
        keys = k_cache[slots].float().repeat_interleave(group, dim=1).transpose(0, 1)
        values = v_cache[slots].float().repeat_interleave(group, dim=1).transpose(0, 1)
        queries = q[start:end].float().transpose(0, 1)  # [H, q_len, D]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        mask = k_pos[None, :] <= q_pos[:, None]
        attended = torch.nn.functional.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, scale=scale
        )
        out[start:end] = attended.transpose(0, 1).to(q.dtype)
    return out
