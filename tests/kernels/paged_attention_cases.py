"""Random paged-KV inputs and a naive dense attention, shared by the kernel tests and the GPU check.

Every builder draws fresh values from the given generator: pages are shuffled across a pool with
spare pages of garbage, and unused block-table entries point at random pages, so a kernel that
reads past a sequence or through the wrong page gets a wrong answer rather than a lucky zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedAttentionCase:
    """Inputs for one decode or prefill call plus the per-sequence dense K/V they were cut from."""

    q: torch.Tensor  # [total_q, Hq, D]
    k_cache: torch.Tensor  # [num_slots, Hkv, D]
    v_cache: torch.Tensor
    block_table: torch.Tensor  # [batch, width] int32
    seq_lens: torch.Tensor  # [batch] int32
    cu_q_lens: torch.Tensor  # [batch + 1] int32
    page_size: int
    scale: float
    dense_k: list[torch.Tensor]  # per sequence [seq_len, Hkv, D]
    dense_v: list[torch.Tensor]

    @property
    def q_lens(self) -> list[int]:
        cu = self.cu_q_lens.tolist()
        return [cu[i + 1] - cu[i] for i in range(len(cu) - 1)]

    @property
    def max_q_len(self) -> int:
        return max(self.q_lens, default=0)


def _randn(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)


def make_case(
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
    spare_pages: int = 3,
    extra_width: int = 2,
) -> PagedAttentionCase:
    """Paged K/V for sequences of `seq_lens` tokens whose last `q_lens` tokens are the queries."""
    assert len(seq_lens) == len(q_lens)
    assert all(0 <= ql <= sl for ql, sl in zip(q_lens, seq_lens, strict=True))
    pages_per_seq = [-(-sl // page_size) for sl in seq_lens]
    num_pages = sum(pages_per_seq) + spare_pages
    width = max(pages_per_seq, default=0) + extra_width
    perm = torch.randperm(num_pages, generator=gen)
    # Unused entries name real pages: wrong reads change the result but never fault.
    block_table = torch.randint(0, num_pages, (len(seq_lens), max(width, 1)), generator=gen)
    k_cache = _randn((num_pages * page_size, num_kv_heads, head_dim), gen, dtype)
    v_cache = _randn((num_pages * page_size, num_kv_heads, head_dim), gen, dtype)
    dense_k, dense_v = [], []
    used = 0
    for row, (sl, npg) in enumerate(zip(seq_lens, pages_per_seq, strict=True)):
        block_table[row, :npg] = perm[used : used + npg]
        used += npg
        pos = torch.arange(sl)
        slots = block_table[row, pos // page_size] * page_size + pos % page_size
        dense_k.append(k_cache[slots])
        dense_v.append(v_cache[slots])
    cu = [0]
    for ql in q_lens:
        cu.append(cu[-1] + ql)
    q = _randn((cu[-1], num_q_heads, head_dim), gen, dtype)
    dev = torch.device(device)
    return PagedAttentionCase(
        q=q.to(dev),
        k_cache=k_cache.to(dev),
        v_cache=v_cache.to(dev),
        block_table=block_table.to(torch.int32).to(dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        cu_q_lens=torch.tensor(cu, dtype=torch.int32, device=dev),
        page_size=page_size,
        scale=head_dim**-0.5,
        dense_k=[t.to(dev) for t in dense_k],
        dense_v=[t.to(dev) for t in dense_v],
    )


def dense_attention(case: PagedAttentionCase) -> torch.Tensor:
    """Float64 attention over the dense per-sequence K/V, written independently of the reference.

    Query i of a sequence with q_len new tokens out of seq_len sits at position
    seq_len - q_len + i and sees keys 0..that position.
    """
    num_q_heads = case.q.shape[1]
    out = torch.empty(case.q.shape, dtype=torch.float64, device=case.q.device)
    start = 0
    for keys, values, q_len in zip(case.dense_k, case.dense_v, case.q_lens, strict=True):
        if q_len == 0:
            continue
        seq_len = keys.shape[0]
        group = num_q_heads // keys.shape[1]
        for h in range(num_q_heads):
            qh = case.q[start : start + q_len, h].double()  # [q_len, D]
            kh = keys[:, h // group].double()  # [seq_len, D]
            vh = values[:, h // group].double()
            scores = (qh @ kh.T) * case.scale
            q_pos = torch.arange(seq_len - q_len, seq_len, device=qh.device)
            hidden = torch.arange(seq_len, device=qh.device)[None, :] > q_pos[:, None]
            scores = scores.masked_fill(hidden, float("-inf"))
            weights = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
            out[start : start + q_len, h] = (weights @ vh) / weights.sum(dim=1, keepdim=True)
        start += q_len
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives NaN (which fails any <= check)."""
    diff = (out.double() - ref.double()).norm()
    return float(diff / ref.double().norm())
