"""Plain-PyTorch attention of speculative-verify rows: the CPU path and the oracle for Triton.

A verify row is a sequence whose last token and up to Q - 1 draft tokens are scored in one
forward: its q_len (1 <= q_len <= Q) new tokens are the last positions of seq_len, attend to the
whole cached prefix and causally among themselves. Rows are laid out with a *fixed* stride of Q
query slots (so a batch of B rows always has B * Q query tokens and a CUDA graph can capture it);
slots i >= q_len of a row are padding and come back as zeros, as does a whole row with q_len == 0.

KV layout: the one of `paged_attention_reference` (k_cache/v_cache [num_slots, Hkv, D], block_table
[B, max_pages], token t of row b in slot block_table[b, t // page_size] * page_size + t % page_size).
  q:        [B * Q, Hq, D]; query i of row b is q[b * Q + i], at position seq_len - q_len + i.
  q_lens:   [B] int, new tokens of each row (0 <= q_lens <= Q).
  seq_lens: [B] int, cached tokens of each row *including* its new ones.
"""

from __future__ import annotations

import torch


def paged_verify_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    q_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    scale: float,
    q_stride: int,
) -> torch.Tensor:
    """q [B * q_stride, Hq, D] -> same shape; causal within each row's new tokens.

    Vectorised over the batch (keys gathered into a padded [B, max_len] block and masked), like
    the decode reference.
    """
    total, num_q_heads, head_dim = q.shape
    batch = q_lens.shape[0]
    if total != batch * q_stride:
        raise ValueError(f"q has {total} rows, expected batch {batch} * q_stride {q_stride}")
    out = torch.zeros_like(q)
    if batch == 0:
        return out
    num_kv_heads = k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    max_len = max(int(seq_lens.max().item()), 1)
    positions = torch.arange(max_len, device=q.device)
    pages = block_table[:, : (max_len + page_size - 1) // page_size].long()
    slots = pages[:, positions // page_size] * page_size + positions % page_size  # [B, L]
    in_seq = positions[None, :] < seq_lens[:, None].long()
    flat = slots.masked_fill(~in_seq, 0).flatten()
    keys = k_cache.index_select(0, flat).view(batch, max_len, num_kv_heads, head_dim)
    values = v_cache.index_select(0, flat).view(batch, max_len, num_kv_heads, head_dim)
    keys = keys.permute(0, 2, 1, 3).float()  # [B, Hkv, L, D]
    values = values.permute(0, 2, 1, 3).float()
    # [B, Hkv, Q * G, D]: the query rows of one kv head, query-major then group member.
    qg = q.view(batch, q_stride, num_kv_heads, group, head_dim).permute(0, 2, 1, 3, 4).float()
    qg = qg.reshape(batch, num_kv_heads, q_stride * group, head_dim)
    scores = torch.matmul(qg, keys.transpose(-1, -2)) * scale  # [B, Hkv, Q * G, L]
    qi = torch.arange(q_stride, device=q.device).repeat_interleave(group)  # [Q * G]
    q_pos = (seq_lens - q_lens).long()[:, None] + qi[None, :]  # [B, Q * G]
    visible = (positions[None, None, :] <= q_pos[:, :, None]) & in_seq[:, None, :]
    live = qi[None, :] < q_lens.long()[:, None]  # [B, Q * G]
    visible &= live[:, :, None]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    # Padding rows see nothing: softmax over all -inf is NaN, so give them a zero result.
    probs = torch.softmax(scores.masked_fill(~live[:, None, :, None], 0.0), dim=-1)
    res = torch.matmul(probs, values)  # [B, Hkv, Q * G, D]
    res = res.masked_fill(~live[:, None, :, None], 0.0)
    res = res.view(batch, num_kv_heads, q_stride, group, head_dim).permute(0, 2, 1, 3, 4)
    out.copy_(res.reshape(total, num_q_heads, head_dim).to(q.dtype))
    return out
