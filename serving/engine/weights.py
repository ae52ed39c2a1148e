"""In-place weight updates by parameter name, and memory release/resume.

Runs on the engine thread between steps. After new weights land, cached prefixes computed with
the old weights are dropped (those still in use by running requests go when they finish), so a
new request never reuses stale KV.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rollout_accel.serving.models.config import ModelConfig, ModelConfigError
from rollout_accel.serving.models.loader import ModelLoadError, iter_safetensors, load_named_tensors

if TYPE_CHECKING:
    from rollout_accel.serving.engine.engine import Engine

MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")


class WeightUpdater:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._offloaded: dict[str, torch.Tensor] = {}

    def _after_update(self, flush_cache: bool, weight_version: str | None) -> None:
        cache = self.engine.cache
        if flush_cache:
            cache.evict(cache.cached_slots)
        if weight_version is not None:
            self.engine.set_weight_version(weight_version)

    def from_tensors(
        self,
        named_tensors: list[tuple[str, torch.Tensor]],
        flush_cache: bool = True,
        weight_version: str | None = None,
    ) -> tuple[bool, str]:
        if self._offloaded:
            return False, "weights are released; resume_memory_occupation first"
        try:
            count = load_named_tensors(self.engine.model, named_tensors)
        except ModelLoadError as exc:
            return False, str(exc)
        self._after_update(flush_cache, weight_version)
        return True, f"updated {count} parameters"

    def from_disk(
        self, model_path: str, flush_cache: bool = True, weight_version: str | None = None
    ) -> tuple[bool, str]:
        path = Path(model_path)
        if not path.is_dir():
            return False, f"model_path: {model_path!r} is not a directory"
        try:
            incoming = ModelConfig.from_dir(path)
        except ModelConfigError as exc:
            return False, str(exc)
        current = self.engine.model_config
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
        ):
            if getattr(incoming, name) != getattr(current, name):
                return False, (
                    f"config.json: {name} is {getattr(incoming, name)}, the served model has "
                    f"{getattr(current, name)}"
                )
        try:
            count = load_named_tensors(
                self.engine.model, list(iter_safetensors(path)), strict_all=True
            )
        except ModelLoadError as exc:
            return False, str(exc)
        self._after_update(flush_cache, weight_version)
        return True, f"loaded {count} parameters from {model_path}"

    def release(self, tags: list[str] | None) -> tuple[bool, str]:
        tags = list(tags or MEMORY_TAGS)
        unknown = [t for t in tags if t not in MEMORY_TAGS]
        if unknown:
            return False, f"tags: unknown tag {unknown[0]!r}; known: {list(MEMORY_TAGS)}"
        if self.engine.scheduler.has_work:
            return False, "requests are in flight; pause or abort them first"
        if "kv_cache" in tags and not self.engine.kv_cache.released:
            self.engine.cache.flush()
            self.engine.kv_cache.release()
        if "weights" in tags and not self._offloaded:
            for name, param in self.engine.model.named_parameters():
                self._offloaded[name] = param.data.to("cpu", copy=True)
                param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        if self.engine.device.type == "cuda":
            torch.cuda.empty_cache()
        return True, f"released {tags}"

    def resume(self, tags: list[str] | None) -> tuple[bool, str]:
        tags = list(tags or MEMORY_TAGS)
        unknown = [t for t in tags if t not in MEMORY_TAGS]
        if unknown:
            return False, f"tags: unknown tag {unknown[0]!r}; known: {list(MEMORY_TAGS)}"
        if "weights" in tags and self._offloaded:
            for name, param in self.engine.model.named_parameters():
                param.data = self._offloaded[name].to(self.engine.device)
            self._offloaded.clear()
            if self.engine.model_config.tie_word_embeddings:
                self.engine.model.lm_head.weight = self.engine.model.model.embed_tokens.weight
            if self.engine.device.type == "cuda":
                self.engine.model.fuse_projections()
        if "kv_cache" in tags and self.engine.kv_cache.released:
            self.engine.kv_cache.reallocate()
        return True, f"resumed {tags}"
