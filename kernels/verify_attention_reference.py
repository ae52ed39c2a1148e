"""Plain-PyTorch attention of speculative-verify batches: the CPU path and the oracle for Triton.

A verify row is a sequence whose last token and up to max_q_len - 1 draft tokens are scored in
one forward: its q_len new tokens (1 <= q_len <= max_q_len, a handful) are the last positions of
seq_len, attend to the whole cached prefix and causally among themselves. The layout is the
prefill one of `paged_attention_reference` (packed queries, `cu_q_lens` offsets); a CUDA graph
uses it with a fixed stride (cu_q_lens = arange * Q, padding rows with q_len < Q). Rows with
q_len == 0 contribute nothing. The difference from prefill is the bound on q_len, which lets the
kernel hold a whole row's queries (times the GQA group) in one tile, and lets this reference
vectorise over the batch instead of looping over rows.

KV layout: `paged_attention_reference` (k_cache/v_cache [num_slots, Hkv, D], block_table).
  q:         [total_q, Hq, D]; row b's queries are q[cu_q_lens[b]:cu_q_lens[b + 1]].
  seq_lens:  [B] int, cached tokens of each row *including* its new ones.
"""

from __future__ import annotations

import torch


def paged_verify_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_q_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    scale: float,
    max_q_len: int,
) -> torch.Tensor:
    """q [total_q, Hq, D] -> same shape; causal within each row's new tokens (q_len <=
    max_q_len). Query rows outside every row's range (padding) are returned as zeros."""
    total, num_q_heads, head_dim = q.shape
    batch = seq_lens.shape[0]
    out = torch.zeros_like(q)
    if batch == 0 or total == 0:
        return out
    num_kv_heads = k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    dev = q.device
    cu = cu_q_lens.long()
    q_lens = cu[1:] - cu[:-1]
    max_len = max(int(seq_lens.max().item()), 1)
    positions = torch.arange(max_len, device=dev)
    pages = block_table[:, : (max_len + page_size - 1) // page_size].long()
    slots = pages[:, positions // page_size] * page_size + positions % page_size  # [B, L]
    in_seq = positions[None, :] < seq_lens[:, None].long()
    flat = slots.masked_fill(~in_seq, 0).flatten()
    keys = k_cache.index_select(0, flat).view(batch, max_len, num_kv_heads, head_dim)
    values = v_cache.index_select(0, flat).view(batch, max_len, num_kv_heads, head_dim)
    keys = keys.permute(0, 2, 1, 3).float()  # [B, Hkv, L, D]
    values = values.permute(0, 2, 1, 3).float()
    qi = torch.arange(max_q_len, device=dev)
    live = qi[None, :] < q_lens[:, None]  # [B, Q]
    rows = (cu[:-1, None] + qi[None, :]).masked_fill(~live, 0)  # [B, Q] packed query index
    qb = q[rows.flatten()].view(batch, max_q_len, num_kv_heads, group, head_dim)
    # [B, Hkv, Q * G, D]: the query rows of one kv head, query-major then group member.
    qg = qb.permute(0, 2, 1, 3, 4).reshape(batch, num_kv_heads, max_q_len * group, head_dim)
    scores = torch.matmul(qg.float(), keys.transpose(-1, -2)) * scale  # [B, Hkv, Q * G, L]
    q_pos = (seq_lens.long() - q_lens)[:, None] + qi[None, :]  # [B, Q]
    visible = (positions[None, None, :] <= q_pos[:, :, None]) & in_seq[:, None, :]
    visible &= live[:, :, None]
    visible = visible.repeat_interleave(group, dim=1)  # [B, Q * G, L]
    # A query that sees no key (padding, or a seq_len-0 row of a CUDA-graph bucket) gets zeros,
    # as in the Triton kernel: never NaN, which would reach the KV it writes (slot 0) and, as
    # 0 * NaN, every query that reads that slot even masked.
    blind = ~visible.any(dim=-1)  # [B, Q * G]
    probs = torch.softmax(scores.masked_fill(~(visible | blind[:, :, None])[:, None], -1e30), -1)
    probs = probs.masked_fill(blind[:, None, :, None], 0.0)
    res = torch.matmul(probs, values)  # [B, Hkv, Q * G, D]
    res = res.view(batch, num_kv_heads, max_q_len, group, head_dim).permute(0, 2, 1, 3, 4)
    res = res.reshape(batch, max_q_len, num_q_heads, head_dim)
    out[rows[live]] = res[live].to(q.dtype)
    return out
