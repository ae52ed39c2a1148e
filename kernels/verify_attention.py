"""Verify-attention dispatch: the Triton kernel on CUDA tensors, the reference elsewhere.

Shares `ROLLOUT_ACCEL_ATTENTION=reference|triton` with the other attention kernels. Layout and
semantics: `verify_attention_reference`.
"""

from __future__ import annotations

import torch

from .attention import ENV_VAR
from .backend import Backend, choose_backend
from .verify_attention_reference import paged_verify_attention_reference

try:
    from . import verify_attention_triton as _triton_impl
except ImportError:  # no triton on this machine: the reference serves every call
    _triton_impl = None


def verify_backend(device: torch.device) -> Backend:
    return choose_backend(ENV_VAR, device, _triton_impl is not None)


def verify_attention(
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
) -> torch.Tensor:
    """Rows of at most `max_q_len` new tokens each (packed by `cu_q_lens`), causal within the
    row, over the paged prefix: q [total_q, Hq, D] -> same (written into `out` if given)."""
    if verify_backend(q.device) == "triton":
        assert _triton_impl is not None
        return _triton_impl.paged_verify_attention(
            q, k_cache, v_cache, block_table, cu_q_lens, seq_lens, page_size, scale, max_q_len, out
        )
    res = paged_verify_attention_reference(
        q, k_cache, v_cache, block_table, cu_q_lens, seq_lens, page_size, scale, max_q_len
    )
    return res if out is None else out.copy_(res)
