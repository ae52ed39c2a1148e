"""Triton re-rotation of cached rotary keys (same math and layout as `rerotate`'s reference).

One program per token moves every kv head of that token: it reads both halves of each head
before writing, so src == dst (in place) is safe per token. Angles are fl32(new * f) -
fl32(old * f) taken exactly as in the reference; cos/sin from its float32 hi/lo split; the
rotation in float32; one rounding to the cache dtype.
No host syncs: the grid is the token count.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rerotate_kernel(
    k_ptr,
    src_ptr,
    dst_ptr,
    old_ptr,
    new_ptr,
    freq_ptr,
    stride_t,
    stride_h,
    NUM_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    i = tl.program_id(0)
    src = tl.load(src_ptr + i).to(tl.int64)
    dst = tl.load(dst_ptr + i).to(tl.int64)
    old = tl.load(old_ptr + i).to(tl.float32)
    new = tl.load(new_ptr + i).to(tl.float32)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < HALF
    f = tl.load(freq_ptr + offs_d, mask=d_mask, other=0.0)
    # float32 angles as the tables round them; their difference exactly (float64), split into
    # float32 hi + lo; cos/sin(hi + lo) to first order in lo (|lo| <= ulp(hi) / 2), so no float64
    # transcendental (whose slow path spills) is needed.
    angle = (new * f).to(tl.float64) - (old * f).to(tl.float64)
    hi = angle.to(tl.float32)
    lo = (angle - hi.to(tl.float64)).to(tl.float32)
    c_hi = tl.cos(hi)
    s_hi = tl.sin(hi)
    c = (c_hi - s_hi * lo)[None, :]
    s = (s_hi + c_hi * lo)[None, :]
    mask = (offs_h < NUM_HEADS)[:, None] & d_mask[None, :]
    offs = offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(k_ptr + src * stride_t + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(k_ptr + src * stride_t + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * c - x2 * s
    o2 = x2 * c + x1 * s
    out_ty = k_ptr.dtype.element_ty
    tl.store(k_ptr + dst * stride_t + offs, o1.to(out_ty), mask=mask)
    tl.store(k_ptr + dst * stride_t + offs + HALF, o2.to(out_ty), mask=mask)


def rerotate_keys(
    k_cache: torch.Tensor,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    old_pos: torch.Tensor,
    new_pos: torch.Tensor,
    inv_freq: torch.Tensor,
) -> None:
    """k_cache[dst] = R(new_pos - old_pos) k_cache[src]; arguments as in `rerotate.rerotate_keys`."""
    if k_cache.stride(-1) != 1:
        raise ValueError("k_cache must be contiguous in head_dim")
    n = src_slots.shape[0]
    if n == 0:
        return
    num_heads, head_dim = k_cache.shape[1], k_cache.shape[2]
    half = head_dim // 2
    dev = k_cache.device
    _rerotate_kernel[(n,)](
        k_cache,
        src_slots.to(dev).contiguous(),
        dst_slots.to(dev).contiguous(),
        old_pos.to(dev).contiguous(),
        new_pos.to(dev).contiguous(),
        inv_freq.to(dev, torch.float32).contiguous(),
        k_cache.stride(0),
        k_cache.stride(1),
        NUM_HEADS=num_heads,
        HALF=half,
        BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=1 if num_heads * head_dim <= 512 else 4,
    )
