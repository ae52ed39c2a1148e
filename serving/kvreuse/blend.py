"""Selective-recompute prefill (CacheBlend): reuse chunk KV, recompute only what deviates most.

A prompt [0, L) whose first `prefix_len` tokens already have exact KV (the radix prefix) and whose
reused spans were placed (re-rotated) from stored chunks is prefilled as follows:
  * layers [0, check_layer): every token of [prefix_len, L) is computed, as in full prefill;
  * check layer: Q/K/V of every token are computed and written; the fresh K (or V) of each reused
    token is compared with its placed cached one, and the `recompute_ratio` share of reused
    tokens that deviate most is selected, with every new (non-reused) token and the last token;
  * later layers: Q/K/V, attention and MLP for the selected tokens only; their K/V are scattered
    over the placed KV, and their queries attend causally over the whole sequence.
The request's KV for [prefix_len, L) ends up in its slots, so decoding continues from it as after
any prefill. recompute_ratio = 1 is full prefill, op for op (bit-identical on the reference path).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from rollout_accel.kernels.attention import prefill_attention
from rollout_accel.kernels.fused_ops import add_rms_norm, qk_norm_rope, rms_norm
from rollout_accel.kernels.selective_attention import selective_attention
from rollout_accel.serving.kvreuse.chunk_store import Chunk
from rollout_accel.serving.kvreuse.rerotate import inv_freq, place_chunks
from rollout_accel.serving.models.decoder import Attention, CausalLM
from rollout_accel.serving.models.paged_kv import PagedKVCache


@dataclass(frozen=True, slots=True)
class BlendSettings:
    """recompute_ratio: share of reused tokens recomputed after the check layer (1 = full
    prefill); check_layer >= 1: where deviations are measured (layers below it run in full);
    deviation: which of K or V is compared."""

    recompute_ratio: float = 0.15
    check_layer: int = 1
    deviation: Literal["k", "v"] = "k"

    def __post_init__(self) -> None:
        if not 0.0 <= self.recompute_ratio <= 1.0:
            raise ValueError(f"recompute_ratio: expected in [0, 1], got {self.recompute_ratio}")
        if self.check_layer < 1:
            raise ValueError(f"check_layer: expected >= 1, got {self.check_layer}")
        if self.deviation not in ("k", "v"):
            raise ValueError(f"deviation: expected 'k' or 'v', got {self.deviation!r}")


@dataclass(frozen=True, slots=True)
class ReusedSpan:
    """Prompt tokens [start, end) are tokens [chunk_start, chunk_start + end - start) of `chunk`."""

    start: int
    end: int
    chunk: Chunk
    chunk_start: int = 0

    def __len__(self) -> int:
        return self.end - self.start


@dataclass(slots=True)
class BlendResult:
    """Logits of the last prompt position, and what was computed."""

    logits: torch.Tensor  # [vocab] float32
    new_tokens: int  # tokens of [prefix_len, L) not reused
    reused_tokens: int
    recomputed_reused: int  # reused tokens selected at the check layer
    token_layers: int  # sum over layers of tokens whose layer was computed
    num_layers: int

    @property
    def computed_tokens(self) -> float:
        """Prefill work in full-token units (token_layers / layers)."""
        return self.token_layers / self.num_layers


def place_spans(
    model: CausalLM,
    cache: PagedKVCache,
    slots: torch.Tensor,
    spans: Sequence[ReusedSpan],
    layers: range,
) -> None:
    """Copies each span's chunk KV into the request's `slots`, K re-rotated to the span's start."""
    freqs = inv_freq(model, cache.k[0].device)
    pieces = [(sp.chunk, sp.chunk_start, slots[sp.start : sp.end], sp.start) for sp in spans]
    place_chunks(cache, pieces, layers, freqs)


def _qkv(
    attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention.forward_paged's projections, q/k norm and rotary, op for op."""
    t = x.shape[0]
    hq, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    if attn.qkv_weight is not None:
        qkv = F.linear(x, attn.qkv_weight, attn.qkv_bias)
        q = qkv[:, : hq * d].view(t, hq, d)
        k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
        v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
    else:
        q = attn.q_proj(x).view(t, hq, d)
        k = attn.k_proj(x).view(t, hkv, d)
        v = attn.v_proj(x).view(t, hkv, d)
    if attn.qk_norm:
        q, k = qk_norm_rope(q, k, cos, sin, attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps)
    else:
        q, k = qk_norm_rope(q, k, cos, sin)
    return q, k, v


def _select(
    fresh: torch.Tensor,
    cached: torch.Tensor,
    reused: torch.Tensor,
    n_keep: int,
) -> torch.Tensor:
    """Indices (ascending) of: every non-reused token, the last token, and the `n_keep` reused
    tokens whose fresh K/V deviate most (L2 over heads and dims) from the cached ones."""
    keep = ~reused
    keep[-1] = True
    if n_keep > 0:
        score = (fresh.float() - cached.float()).pow(2).sum(dim=(1, 2))
        score = score.masked_fill(~reused, float("-inf"))
        keep[torch.topk(score, n_keep).indices] = True
    return keep.nonzero().squeeze(1)


@torch.inference_mode()
def blend_prefill(
    model: CausalLM,
    cache: PagedKVCache,
    input_ids: Sequence[int],
    slots: torch.Tensor,
    prefix_len: int,
    spans: Sequence[ReusedSpan],
    settings: BlendSettings,
) -> BlendResult:
    """Writes the KV of prompt tokens [prefix_len, L) into `slots[prefix_len:]`; returns the last
    position's logits. `slots` [L] holds every prompt token's slot (the prefix's included);
    `spans` lie in [prefix_len, L), ascending; their chunks must stay locked during the call."""
    total = len(input_ids)
    n = total - prefix_len
    if n <= 0:
        raise ValueError("blend_prefill: nothing to compute (the prefix covers the prompt)")
    if slots.numel() != total:
        raise ValueError(f"slots: {slots.numel()} slots for {total} prompt tokens")
    layers = model.model.layers
    num_layers = len(layers)
    dev = cache.k[0].device
    reused = torch.zeros(n, dtype=torch.bool)
    prev_end = prefix_len
    for span in spans:
        if span.start < prev_end or span.end > total or span.end <= span.start:
            raise ValueError(f"spans: [{span.start}, {span.end}) is out of order or out of range")
        reused[span.start - prefix_len : span.end - prefix_len] = True
        prev_end = span.end
    n_reused = int(reused.sum())
    check = settings.check_layer
    selecting = n_reused > 0 and settings.recompute_ratio < 1.0 and check < num_layers
    if selecting:
        place_spans(model, cache, slots, spans, range(check, num_layers))
    n_keep = math.ceil(settings.recompute_ratio * n_reused - 1e-9)
    reused = reused.to(dev)

    positions = torch.arange(prefix_len, total, device=dev)
    cos, sin = model.model.rotary(positions, max_position=total - 1)
    slot_map = slots[prefix_len:].to(dev)
    block_table = slots.to(dev, torch.int32)[None, :]
    seq_lens = torch.tensor([total], dtype=torch.int32, device=dev)
    hidden = model.embed(torch.as_tensor(list(input_ids[prefix_len:]), device=dev))
    residual: torch.Tensor | None = None
    q_pos: torch.Tensor | None = None  # None: every token of [prefix_len, L) is a query
    token_layers = 0
    recomputed_reused = n_reused
    cu: torch.Tensor | None = None
    cu_rows = -1
    for index, layer in enumerate(layers):
        attn = layer.self_attn
        norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
        if residual is None:
            residual = hidden
            normed = rms_norm(hidden, norm1.weight, norm1.eps)
        else:
            normed, residual = add_rms_norm(hidden, residual, norm1.weight, norm1.eps)
        q, k, v = _qkv(attn, normed, cos, sin)
        k_cache, v_cache = cache.k[index], cache.v[index]
        if selecting and index == check:
            cached = (k_cache if settings.deviation == "k" else v_cache)[slot_map]
            keep = _select(k if settings.deviation == "k" else v, cached, reused, n_keep)
            recomputed_reused = int(reused[keep].sum())
            k_cache[slot_map] = k.to(k_cache.dtype)
            v_cache[slot_map] = v.to(v_cache.dtype)
            q, residual = q[keep], residual[keep]
            cos, sin, slot_map = cos[keep], sin[keep], slot_map[keep]
            q_pos = positions[keep]
        else:
            k_cache[slot_map] = k.to(k_cache.dtype)
            v_cache[slot_map] = v.to(v_cache.dtype)
        rows = q.shape[0]
        token_layers += rows
        if cu is None or rows != cu_rows:  # built once per phase: a host->device copy syncs
            cu, cu_rows = torch.tensor([0, rows], dtype=torch.int32, device=dev), rows
        if q_pos is None:
            out = prefill_attention(
                q, k_cache, v_cache, block_table, cu, seq_lens, 1, attn.scale, max_q_len=rows
            )
        else:
            out = selective_attention(
                q, k_cache, v_cache, block_table, cu, seq_lens, q_pos, 1, attn.scale, rows
            )
        normed, residual = add_rms_norm(
            attn.o_proj(out.flatten(-2)), residual, norm2.weight, norm2.eps
        )
        hidden = layer.mlp.forward_fused(normed)
    assert residual is not None
    norm = model.model.norm
    normed, _ = add_rms_norm(hidden[-1:], residual[-1:], norm.weight, norm.eps)
    logits = model.lm_head(normed).float()[0]
    return BlendResult(
        logits=logits,
        new_tokens=n - n_reused,
        reused_tokens=n_reused,
        recomputed_reused=recomputed_reused,
        token_layers=token_layers,
        num_layers=num_layers,
    )
