"""Weight updates by name under pipeline parallelism: every name is checked against the full
model's shapes on stage 0 first (a refused update changes nothing on any stage), then each
tensor goes to the stage(s) owning it under the current partition (after a rebalance, a layer's
updates follow it to its new stage)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rollout_accel.serving.engine.weights import WeightUpdater
from rollout_accel.serving.models.loader import iter_safetensors

if TYPE_CHECKING:
    from rollout_accel.serving.pipeline.runner import PipelineRunner

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class PipelineWeightUpdater(WeightUpdater):
    """`WeightUpdater` whose writes are routed to the owning stages."""

    runner: PipelineRunner

    def _check(self, named: list[tuple[str, torch.Tensor]], strict_all: bool) -> str | None:
        shapes = dict(self.runner.executor.shapes)
        if self.model_config.tie_word_embeddings:
            shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
        for name, tensor in named:
            if name not in shapes:
                return f"weights: unknown parameter name {name!r}"
            if tuple(tensor.shape) != shapes[name]:
                return (
                    f"weights: {name!r} has shape {tuple(tensor.shape)}, the model expects "
                    f"{shapes[name]}"
                )
        if strict_all:
            given = {n for n, _ in named}
            if self.model_config.tie_word_embeddings:
                given.add("lm_head.weight")
            missing = [n for n in shapes if n not in given]
            if missing:
                return f"weights: missing parameters, e.g. {missing[:3]}"
        return None

    def from_tensors(
        self,
        named_tensors: list[tuple[str, torch.Tensor]],
        flush_cache: bool = True,
        weight_version: str | None = None,
        strict_all: bool = False,
    ) -> tuple[bool, str]:
        if "weights" in self.runner.released:
            return False, "weights are released; resume_memory_occupation first"
        named = [(n, t) for n, t in named_tensors if not n.endswith(_IGNORED_SUFFIXES)]
        problem = self._check(named, strict_all)
        if problem is not None:
            return False, problem
        count = self.runner.load_weights(named)
        self._after_update(flush_cache, weight_version)
        return True, f"updated {count} parameters"

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
        ok, message = self.from_tensors(
            list(iter_safetensors(path)), flush_cache, weight_version, strict_all=True
        )
        return ok, (message.replace("updated", "loaded") + f" from {model_path}" if ok else message)
