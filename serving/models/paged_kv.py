"""What a model layer needs to attend over the engine's paged KV cache.

The model writes each new token's K/V into its slot and then attends through the block table
(layout: rollout_accel.kernels.paged_attention_reference). The engine owns which slots are free;
this file only holds the buffers and the per-step metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rollout_accel.kernels.attention import decode_attention, prefill_attention
from rollout_accel.kernels.verify_attention import verify_attention


@dataclass(slots=True)
class AttentionMetadata:
    """One forward step's view of the cache.

    slot_mapping[i] is the slot that new token i writes; the new tokens of sequence b are
    q[cu_q_lens[b]:cu_q_lens[b+1]] and are its last positions of seq_lens[b].
    """

    slot_mapping: torch.Tensor  # [total_q] int64
    block_table: torch.Tensor  # [batch, max_pages] int32
    seq_lens: torch.Tensor  # [batch] int32
    cu_q_lens: torch.Tensor  # [batch + 1] int32
    page_size: int
    is_decode: bool  # every sequence has exactly one new token
    max_q_len: int = 1
    num_decode: int = 0  # the first num_decode sequences have exactly one new token each
    verify: bool = False  # every sequence has at most max_q_len (<= 16) new tokens (serving/spec)


class PagedKVCache:
    """Per-layer K and V buffers of shape [num_slots, num_kv_heads, head_dim]."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_slots, num_kv_heads, head_dim)
        self.num_slots = num_slots
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def release(self) -> None:
        """Drops the buffers (release_memory_occupation); `reallocate` brings them back."""
        self._shape = (len(self.k), *self.k[0].shape)
        self._dtype, self._device = self.k[0].dtype, self.k[0].device
        self.k, self.v = [], []

    def reallocate(self) -> None:
        layers, *shape = self._shape
        self.k = [torch.zeros(shape, dtype=self._dtype, device=self._device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=self._dtype, device=self._device) for _ in range(layers)]

    @property
    def released(self) -> bool:
        return not self.k


def paged_attention(
    layer_idx: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    cache: PagedKVCache,
    scale: float,
) -> torch.Tensor:
    """Stores k, v ([total_q, kv_heads, dim]) in their slots, then attends. Returns [total_q, q_heads, dim]."""
    k_cache, v_cache = cache.k[layer_idx], cache.v[layer_idx]
    k_cache[meta.slot_mapping] = k.to(k_cache.dtype)
    v_cache[meta.slot_mapping] = v.to(v_cache.dtype)
    if meta.verify:
        return verify_attention(
            q,
            k_cache,
            v_cache,
            meta.block_table,
            meta.cu_q_lens,
            meta.seq_lens,
            meta.page_size,
            scale,
            meta.max_q_len,
        )
    if meta.is_decode:
        return decode_attention(
            q, k_cache, v_cache, meta.block_table, meta.seq_lens, meta.page_size, scale
        )
    nd = meta.num_decode
    if nd:
        # Mixed batch: decoding sequences come first, one query row each; they take the decode
        # kernel and the rest the prefill kernel, so decodes keep moving while prompts prefill.
        head = decode_attention(
            q[:nd],
            k_cache,
            v_cache,
            meta.block_table[:nd],
            meta.seq_lens[:nd],
            meta.page_size,
            scale,
        )
        tail = prefill_attention(
            q[nd:],
            k_cache,
            v_cache,
            meta.block_table[nd:],
            meta.cu_q_lens[nd:] - nd,
            meta.seq_lens[nd:],
            meta.page_size,
            scale,
            max_q_len=meta.max_q_len,
        )
        return torch.cat([head, tail])
    return prefill_attention(
        q,
        k_cache,
        v_cache,
        meta.block_table,
        meta.cu_q_lens,
        meta.seq_lens,
        meta.page_size,
        scale,
        max_q_len=meta.max_q_len,
    )
