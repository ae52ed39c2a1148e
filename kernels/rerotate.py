"""Re-rotation of cached rotary keys to new positions (KV reuse at another position).

A key cached after rotary at position p_old is moved to p_new without the pre-rotary key: rotary
embeddings are per-frequency 2-D rotations, so R(a_new) = R(a_new - a_old) R(a_old). The angle
difference is taken (in float64) between the two fp32 angles the model's own tables use
(fl(p * inv_freq)), so the result matches a key rotated at p_new up to the rounding of one extra
float32 rotation, at any position.

Layout: `k_cache` [num_slots, num_kv_heads, head_dim] (one layer of the paged cache, see
`paged_attention_reference`); rotary in Hugging Face's rotate_half form (the first and second
halves of head_dim pair up); `inv_freq` [head_dim // 2] float32.

`rerotate_keys` writes k_cache[dst_slots[i]] = R(new_pos[i] - old_pos[i]) k_cache[src_slots[i]].
In place (src == dst) is allowed per token; otherwise the src and dst sets must be disjoint.
Arithmetic is float32; one rounding to the cache dtype at the end. `ROLLOUT_ACCEL_REROTATE=
reference|triton` forces a backend (read once per process; `backend.reload_overrides` reads it
again).
"""

from __future__ import annotations

import torch

from .backend import Backend, choose_backend

try:
    from . import rerotate_triton as _triton_impl
except ImportError:  # no triton on this machine: the reference serves every call
    _triton_impl = None

ENV_VAR = "ROLLOUT_ACCEL_REROTATE"


def triton_available() -> bool:
    """Whether the Triton kernel imported."""
    return _triton_impl is not None


def rerotate_backend(device: torch.device) -> Backend:
    """Backend used for tensors on `device`: the env override, else Triton on CUDA if present."""
    return choose_backend(ENV_VAR, device, _triton_impl is not None)


def rotation_angles(
    old_pos: torch.Tensor, new_pos: torch.Tensor, inv_freq: torch.Tensor
) -> torch.Tensor:
    """[N, head_dim // 2] float64: fl32(new * f) - fl32(old * f), the difference of the tables'
    own float32 angles, taken in float64 (in float32 it would lose up to half an ulp of the
    angle, 2e-4 rad at position 8000)."""
    f = inv_freq.float()[None, :]
    a_new = (new_pos.float()[:, None] * f).double()
    a_old = (old_pos.float()[:, None] * f).double()
    return a_new - a_old


def rerotate_reference(
    k: torch.Tensor, old_pos: torch.Tensor, new_pos: torch.Tensor, inv_freq: torch.Tensor
) -> torch.Tensor:
    """k [N, H, D] rotated at old_pos -> the same keys rotated at new_pos (k's dtype)."""
    half = k.shape[-1] // 2
    angle = rotation_angles(old_pos.to(k.device), new_pos.to(k.device), inv_freq.to(k.device))
    cos, sin = angle.cos().float()[:, None, :], angle.sin().float()[:, None, :]
    x = k.float()
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(k.dtype)


def rerotate_keys_reference(
    k_cache: torch.Tensor,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    old_pos: torch.Tensor,
    new_pos: torch.Tensor,
    inv_freq: torch.Tensor,
) -> None:
    k_cache[dst_slots] = rerotate_reference(k_cache[src_slots], old_pos, new_pos, inv_freq)


def _check(
    k_cache: torch.Tensor,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    old_pos: torch.Tensor,
    new_pos: torch.Tensor,
    inv_freq: torch.Tensor,
) -> None:
    if k_cache.dim() != 3 or k_cache.shape[-1] % 2:
        raise ValueError(
            f"k_cache must be [slots, heads, even head_dim], got {tuple(k_cache.shape)}"
        )
    n = src_slots.shape[0]
    for name, t in (("dst_slots", dst_slots), ("old_pos", old_pos), ("new_pos", new_pos)):
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape [{n}], got {tuple(t.shape)}")
    if inv_freq.shape != (k_cache.shape[-1] // 2,):
        raise ValueError(
            f"inv_freq must have shape [{k_cache.shape[-1] // 2}], got {tuple(inv_freq.shape)}"
        )


def rerotate_keys(
    k_cache: torch.Tensor,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    old_pos: torch.Tensor,
    new_pos: torch.Tensor,
    inv_freq: torch.Tensor,
) -> None:
    """k_cache[dst] = R(new_pos - old_pos) k_cache[src], per token (slots and positions [N])."""
    _check(k_cache, src_slots, dst_slots, old_pos, new_pos, inv_freq)
    if src_slots.numel() == 0:
        return
    if rerotate_backend(k_cache.device) == "triton":
        assert _triton_impl is not None
        _triton_impl.rerotate_keys(k_cache, src_slots, dst_slots, old_pos, new_pos, inv_freq)
        return
    rerotate_keys_reference(k_cache, src_slots, dst_slots, old_pos, new_pos, inv_freq)
