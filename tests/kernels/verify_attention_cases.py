"""Random verify-attention inputs (packed rows of a few queries each) and their dense answer.

Built on `paged_attention_cases.make_case` (shuffled pages, garbage spare pages); `pad` extra query
rows after the last row stand for the unused tail of a fixed-size (CUDA-graph) buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tests.kernels.paged_attention_cases import PagedAttentionCase, dense_attention, make_case


@dataclass
class VerifyCase:
    base: PagedAttentionCase
    q: torch.Tensor  # [total_q + pad, Hq, D]
    max_q_len: int

    def args(self) -> tuple:
        b = self.base
        return (b.k_cache, b.v_cache, b.block_table, b.cu_q_lens, b.seq_lens, b.page_size, b.scale)


def make_verify_case(
    seq_lens: list[int],
    q_lens: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype = torch.float32,
    *,
    gen: torch.Generator,
    device: str | torch.device = "cpu",
    pad: int = 0,
) -> VerifyCase:
    base = make_case(
        seq_lens,
        q_lens,
        num_q_heads,
        num_kv_heads,
        head_dim,
        page_size,
        dtype,
        gen=gen,
        device=device,
    )
    extra = torch.randn((pad, num_q_heads, head_dim), generator=gen).to(dtype).to(base.q.device)
    return VerifyCase(base=base, q=torch.cat([base.q, extra]), max_q_len=max(max(q_lens), 1))


def dense_verify(case: VerifyCase) -> torch.Tensor:
    """Float64 answer; padding rows zero."""
    out = torch.zeros(case.q.shape, dtype=torch.float64, device=case.q.device)
    total = case.base.q.shape[0]
    out[:total] = dense_attention(case.base)
    return out
