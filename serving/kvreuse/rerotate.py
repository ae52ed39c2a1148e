"""Moving a stored chunk's KV to a new position: which rotary variants allow it, and the copy.

Only plain rotary (Hugging Face's `default` rope type over the whole head_dim, angle = p * f) is
re-rotated; anything else (rope scaling types such as linear / dynamic / yarn / llama3, partial
rotary, a rotary module other than ours) gets a reason from `rope_refusal`, and the caller falls
back to full prefill and counts it, instead of producing wrong KV.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rollout_accel.kernels.rerotate import rerotate_keys
from rollout_accel.serving.kvreuse.chunk_store import Chunk
from rollout_accel.serving.models.decoder import CausalLM, RotaryEmbedding
from rollout_accel.serving.models.paged_kv import PagedKVCache

_PLAIN_ROPE_TYPES = (None, "default")


def rope_refusal(model: CausalLM) -> str | None:
    """Why this model's keys cannot be re-rotated (None: they can)."""
    config = model.config
    extra = config.extra or {}
    scaling = extra.get("rope_scaling") or extra.get("rope_parameters")
    if isinstance(scaling, dict):
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in _PLAIN_ROPE_TYPES:
            return f"rope_scaling type {kind!r} is not re-rotated"
    partial = extra.get("partial_rotary_factor")
    if partial is not None and float(partial) != 1.0:
        return f"partial_rotary_factor {partial} is not re-rotated"
    rotary = getattr(model.model, "rotary", None)
    if type(rotary) is not RotaryEmbedding:
        return f"rotary module {type(rotary).__name__} is not re-rotated"
    if rotary.head_dim != config.head_dim:
        return f"rotary over {rotary.head_dim} of {config.head_dim} dims (partial rotary)"
    return None


def inv_freq(model: CausalLM, device: torch.device) -> torch.Tensor:
    """The model's own rotary frequencies (float32), as its tables use them."""
    return model.model.rotary.inv_freq.to(device, torch.float32)


def place_chunks(
    cache: PagedKVCache,
    pieces: Sequence[tuple[Chunk, int, torch.Tensor, int]],
    layers: range,
    freqs: torch.Tensor,
) -> None:
    """For each (chunk, chunk_start, dst_slots, new_position): copies tokens [chunk_start,
    chunk_start + len(dst_slots)) of the chunk into `dst_slots`, K re-rotated so token i sits at
    `new_position + i`, for `layers`. One V copy and one re-rotation launch per layer for all."""
    pieces = [p for p in pieces if p[2].numel()]
    if not pieces:
        return
    dev = cache.k[0].device
    src = torch.cat([c.slots[s : s + d.numel()] for c, s, d, _ in pieces]).to(dev)
    dst = torch.cat([d for _, _, d, _ in pieces]).to(dev)
    old_pos = torch.cat([c.positions(s, s + d.numel()) for c, s, d, _ in pieces]).to(dev)
    new_pos = torch.cat(
        [torch.arange(p, p + d.numel(), dtype=torch.int64) for _, _, d, p in pieces]
    ).to(dev)
    for layer in layers:
        cache.v[layer][dst] = cache.v[layer][src]
        rerotate_keys(cache.k[layer], src, dst, old_pos, new_pos, freqs)
