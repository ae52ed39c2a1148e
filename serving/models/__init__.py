"""Llama / Qwen2 / Qwen3 dense decoders, presets and the HF-layout loader."""

from rollout_accel.serving.models.config import ModelConfig, ModelConfigError
from rollout_accel.serving.models.decoder import CausalLM
from rollout_accel.serving.models.loader import (
    LoadedModel,
    ModelLoadError,
    load_model,
    materialize_preset,
    save_model_dir,
)
from rollout_accel.serving.models.presets import PRESETS, preset_names
from rollout_accel.serving.models.tokenizer import TextTokenizer

__all__ = [
    "PRESETS",
    "CausalLM",
    "LoadedModel",
    "ModelConfig",
    "ModelConfigError",
    "ModelLoadError",
    "TextTokenizer",
    "load_model",
    "materialize_preset",
    "preset_names",
    "save_model_dir",
]
