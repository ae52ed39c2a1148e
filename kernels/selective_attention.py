"""Attention of queries at arbitrary positions over a paged KV cache (selective recompute).

Selective-recompute prefill (CacheBlend) recomputes only some tokens of a prompt in later layers:
their queries sit at scattered positions, and each attends causally to every token of its
sequence up to and including its own position (the others' KV is cached or reused). With
contiguous trailing positions this is exactly `prefill_attention`.

Layout as in `paged_attention_reference`, plus q_positions [total_q] (int32/int64): the position
of each query in its sequence, ascending within a sequence, each < seq_lens[b]. The reference
below is the CPU path and the oracle; `ROLLOUT_ACCEL_SELECTIVE_ATTENTION=reference|triton`
forces a backend (read once
per process; `backend.reload_overrides` reads it again).
"""

from __future__ import annotations

import torch

from .backend import Backend, choose_backend
from .paged_attention_reference import token_slots

try:
    from . import selective_attention_triton as _triton_impl
except ImportError:  # no triton on this machine: the reference serves every call
    _triton_impl = None

ENV_VAR = "ROLLOUT_ACCEL_SELECTIVE_ATTENTION"


def triton_available() -> bool:
    """Whether the Triton kernel imported."""
    return _triton_impl is not None


def selective_backend(device: torch.device) -> Backend:
    """Backend used for tensors on `device`: the env override, else Triton on CUDA if present."""
    return choose_backend(ENV_VAR, device, _triton_impl is not None)


def selective_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_q_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    q_positions: torch.Tensor,
    page_size: int,
    scale: float,
) -> torch.Tensor:
    """q [total_q, Hq, D] -> [total_q, Hq, D]; query i sees keys at positions <= q_positions[i].

    Computed as `paged_prefill_attention_reference` computes it (one masked SDPA per sequence in
    float32), so contiguous trailing positions give bit-identical results.
    """
    out = torch.empty_like(q)
    group = q.shape[1] // k_cache.shape[1]
    cu = cu_q_lens.tolist()
    lens = seq_lens.tolist()
    for row in range(len(lens)):
        start, end = cu[row], cu[row + 1]
        if end == start:
            continue
        seq_len = lens[row]
        slots = token_slots(block_table, seq_len, page_size, row)
        keys = k_cache[slots].float().repeat_interleave(group, dim=1).transpose(0, 1)
        values = v_cache[slots].float().repeat_interleave(group, dim=1).transpose(0, 1)
        queries = q[start:end].float().transpose(0, 1)
        q_pos = q_positions[start:end].to(q.device, torch.int64)
        k_pos = torch.arange(seq_len, device=q.device)
        mask = k_pos[None, :] <= q_pos[:, None]
        attended = torch.nn.functional.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, scale=scale
        )
        out[start:end] = attended.transpose(0, 1).to(q.dtype)
    return out


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
    """Dispatch: the Triton kernel on CUDA tensors, the reference elsewhere (same function).

    `max_q_len` (the most queries of one sequence) spares the Triton path a host sync.
    """
    if q.shape[0] != q_positions.shape[0]:
        raise ValueError(f"q_positions must have {q.shape[0]} entries, got {q_positions.shape[0]}")
    if selective_backend(q.device) == "triton":
        assert _triton_impl is not None
        return _triton_impl.selective_attention(
            q,
            k_cache,
            v_cache,
            block_table,
            cu_q_lens,
            seq_lens,
            q_positions,
            page_size,
            scale,
            max_q_len,
        )
    return selective_attention_reference(
        q, k_cache, v_cache, block_table, cu_q_lens, seq_lens, q_positions, page_size, scale
    )
