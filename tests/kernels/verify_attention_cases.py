"""Random verify-attention inputs (fixed query stride per row) and their float64 dense answer.

Built on `paged_attention_cases.make_case`: the packed queries are spread into rows of `q_stride`
slots whose padding holds random garbage, so a kernel that reads a padding slot gets it wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tests.kernels.paged_attention_cases import PagedAttentionCase, dense_attention, make_case


@dataclass
class VerifyCase:
    base: PagedAttentionCase
    q: torch.Tensor  # [B * q_stride, Hq, D]
    q_lens: torch.Tensor  # [B] int32
    q_stride: int

    def args(self) -> tuple:
        b = self.base
        return (b.k_cache, b.v_cache, b.block_table, self.q_lens, b.seq_lens, b.page_size, b.scale)


def make_verify_case(
    seq_lens: list[int],
    q_lens: list[int],
    q_stride: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype = torch.float32,
    *,
    gen: torch.Generator,
    device: str | torch.device = "cpu",
) -> VerifyCase:
    assert all(ql <= q_stride for ql in q_lens)
    base = make_case(
        seq_lens, q_lens, num_q_heads, num_kv_heads, head_dim, page_size, dtype, gen=gen
    )
    q = torch.randn((len(seq_lens) * q_stride, num_q_heads, head_dim), generator=gen).to(dtype)
    cu = base.cu_q_lens.tolist()
    for row, ql in enumerate(q_lens):
        q[row * q_stride : row * q_stride + ql] = base.q[cu[row] : cu[row + 1]]
    dev = torch.device(device)
    base.q = base.q.to(dev)
    base.k_cache, base.v_cache = base.k_cache.to(dev), base.v_cache.to(dev)
    base.block_table, base.seq_lens = base.block_table.to(dev), base.seq_lens.to(dev)
    base.cu_q_lens = base.cu_q_lens.to(dev)
    q_lens_t = torch.tensor(q_lens, dtype=torch.int32, device=dev)
    return VerifyCase(base=base, q=q.to(dev), q_lens=q_lens_t, q_stride=q_stride)


def dense_verify(case: VerifyCase) -> torch.Tensor:
    """Float64 answer in the strided layout: padding slots are zeros."""
    packed = dense_attention(case.base)
    out = torch.zeros(case.q.shape, dtype=torch.float64, device=case.q.device)
    cu = case.base.cu_q_lens.tolist()
    for row, ql in enumerate(case.q_lens.tolist()):
        out[row * case.q_stride : row * case.q_stride + ql] = packed[cu[row] : cu[row + 1]]
    return out
