"""Attention dispatch: the Triton kernels on CUDA tensors, the plain-PyTorch reference elsewhere.

`ROLLOUT_ACCEL_ATTENTION=reference|triton` forces a backend (read on every call, so tests and
ablations can flip it). Both backends compute the same function over the KV layout documented in
`paged_attention_reference`; the Triton path never syncs with the host in decode, the reference
path does (it is the CPU path and the oracle, not meant for CUDA-graph capture).
"""

from __future__ import annotations

import torch

from .backend import Backend, choose_backend
from .paged_attention_reference import (
    paged_decode_attention_reference,
    paged_prefill_attention_reference,
)

try:
    from . import paged_attention_triton as _triton_impl
except ImportError:  # no triton on this machine: the reference serves every call
    _triton_impl = None

ENV_VAR = "ROLLOUT_ACCEL_ATTENTION"


def triton_available() -> bool:
    """Whether the Triton kernels imported."""
    return _triton_impl is not None


def attention_backend(device: torch.device) -> Backend:
    """Backend used for tensors on `device`: the env override, else Triton on CUDA if present."""
    return choose_backend(ENV_VAR, device, _triton_impl is not None)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One new token per sequence: q [batch, Hq, D] -> [batch, Hq, D] (written into `out` if given)."""
    if attention_backend(q.device) == "triton":
        assert _triton_impl is not None
        return _triton_impl.paged_decode_attention(
            q, k_cache, v_cache, block_table, seq_lens, page_size, scale, out
        )
    res = paged_decode_attention_reference(
        q, k_cache, v_cache, block_table, seq_lens, page_size, scale
    )
    return res if out is None else out.copy_(res)


def prefill_attention(
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
) -> torch.Tensor:
    """Packed new tokens, causal among themselves, seeing the cached prefix: q [total_q, Hq, D].

    `max_q_len` (the longest new-token run) spares the Triton path a host sync.
    """
    if attention_backend(q.device) == "triton":
        assert _triton_impl is not None
        return _triton_impl.paged_prefill_attention(
            q, k_cache, v_cache, block_table, cu_q_lens, seq_lens, page_size, scale, max_q_len, out
        )
    res = paged_prefill_attention_reference(
        q, k_cache, v_cache, block_table, cu_q_lens, seq_lens, page_size, scale
    )
    return res if out is None else out.copy_(res)
