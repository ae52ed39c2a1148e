"""Shared set-up for the KV-reuse tests: a tiny model, pools, and an exact slot audit."""

from __future__ import annotations

import torch

from rollout_accel.serving.kvreuse.blend import BlendSettings
from rollout_accel.serving.kvreuse.prefiller import ReusePrefiller
from rollout_accel.serving.models import load_model
from rollout_accel.serving.models.decoder import CausalLM


def tiny_model(name: str = "tiny-qwen3") -> CausalLM:
    model = load_model(name, dtype="float32").model
    model.fuse_projections()
    return model


def make_prefiller(
    model: CausalLM,
    num_slots: int = 4096,
    settings: BlendSettings | None = None,
    min_tokens: int = 8,
    reuse: bool = True,
) -> ReusePrefiller:
    if reuse and settings is None:
        settings = BlendSettings()
    return ReusePrefiller.create(model, num_slots, settings if reuse else None, min_tokens)


def audit_slots(prefiller: ReusePrefiller, request_slots: list[torch.Tensor] = ()) -> None:
    """Every slot but 0 is owned exactly once: free list, radix node, chunk, or a request."""
    alloc = prefiller.allocator
    owners = [torch.as_tensor(alloc._free[: alloc.num_free])]
    owners += [node.value for node in prefiller.radix._all_nodes()]
    if prefiller.store is not None:
        owners.append(prefiller.store.owned_slots())
    owners += list(request_slots)
    everything = torch.cat(owners).tolist()
    assert len(everything) == len(set(everything)), "a slot has two owners"
    assert sorted(everything) == list(range(1, alloc.num_slots)), "a slot has no owner"
    if prefiller.store is not None:
        assert prefiller.store.cached_slots == prefiller.store.owned_slots().numel()
