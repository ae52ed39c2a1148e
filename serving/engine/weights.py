"""In-place weight updates by parameter name (tensors, disk) for a running engine.

Runs on the engine thread between steps. Parameters are written in place, so CUDA graphs stay
valid; `recapture_cuda_graph` captures them again anyway (SGLang's flag). After new weights
land, cached prefixes computed with the old weights are dropped (those still in use by running
requests go when they finish), so a new request never reuses stale KV.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from rollout_accel.serving.engine.model_runner import ModelRunner
from rollout_accel.serving.engine.radix_cache import RadixCache
from rollout_accel.serving.models.config import ModelConfig, ModelConfigError
from rollout_accel.serving.models.loader import ModelLoadError, iter_safetensors, load_named_tensors

_MUST_MATCH = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


class WeightUpdater:
    """Loads new weights into the runner's model; a refused update changes nothing."""

    def __init__(
        self,
        runner: ModelRunner,
        cache: RadixCache,
        model_config: ModelConfig,
        set_weight_version: Callable[[str], None],
    ) -> None:
        self.runner = runner
        self.cache = cache
        self.model_config = model_config
        self.set_weight_version = set_weight_version

    def _after_update(
        self, flush_cache: bool, weight_version: str | None, recapture: bool = False
    ) -> None:
        if flush_cache:
            self.cache.evict(self.cache.cached_slots)
        if weight_version is not None:
            self.set_weight_version(weight_version)
        if recapture:
            self.runner.recapture_if_needed(force=True)

    def from_tensors(
        self,
        named_tensors: list[tuple[str, torch.Tensor]],
        flush_cache: bool = True,
        weight_version: str | None = None,
    ) -> tuple[bool, str]:
        if "weights" in self.runner.released:
            return False, "weights are released; resume_memory_occupation first"
        try:
            count = load_named_tensors(self.runner.model, named_tensors)
        except ModelLoadError as exc:
            return False, str(exc)
        self._after_update(flush_cache, weight_version)
        return True, f"updated {count} parameters"

    def check_checkpoint_dir(self, path: Path) -> str | None:
        """Why the HF-layout directory cannot replace the served weights, or None: it must
        exist and its config.json must match the served model's shape."""
        if not path.is_dir():
            return f"model_path: {str(path)!r} is not a directory"
        try:
            incoming = ModelConfig.from_dir(path)
        except ModelConfigError as exc:
            return str(exc)
        for name in _MUST_MATCH:
            if getattr(incoming, name) != getattr(self.model_config, name):
                return (
                    f"config.json: {name} is {getattr(incoming, name)}, the served model has "
                    f"{getattr(self.model_config, name)}"
                )
        return None

    def disk_update_problem(self, path: Path) -> str | None:
        """Why an update from the checkpoint at `path` cannot start (released weights, a bad
        directory or config), or None."""
        if "weights" in self.runner.released:
            return "weights are released; resume_memory_occupation first"
        return self.check_checkpoint_dir(path)

    def from_disk(
        self,
        model_path: str,
        flush_cache: bool = True,
        weight_version: str | None = None,
        recapture_cuda_graph: bool = False,
    ) -> tuple[bool, str]:
        path = Path(model_path)
        problem = self.disk_update_problem(path)
        if problem is not None:
            return False, problem
        try:
            count = load_named_tensors(
                self.runner.model, list(iter_safetensors(path)), strict_all=True
            )
        except ModelLoadError as exc:
            return False, str(exc)
        self._after_update(flush_cache, weight_version, recapture_cuda_graph)
        return True, f"loaded {count} parameters from {model_path}"
