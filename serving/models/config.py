"""Model configuration for the dense decoders we run (Llama, Qwen2, Qwen3)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


class ModelConfigError(ValueError):
    """A config.json we cannot run, with the field that is wrong."""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The shape of a dense decoder; field names follow Hugging Face's config.json.

    Invariant: num_attention_heads is a multiple of num_key_value_heads.
    """

    architecture: str  # "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    torch_dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES.values():
            raise ModelConfigError(f"architecture: unsupported {self.architecture!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(
                "num_attention_heads must be a multiple of num_key_value_heads, got "
                f"{self.num_attention_heads} and {self.num_key_value_heads}"
            )

    @property
    def qk_norm(self) -> bool:
        """Qwen3 normalises q and k per head before RoPE."""
        return self.architecture == "qwen3"

    @property
    def hf_architecture(self) -> str:
        return {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[self.architecture]

    def with_updates(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = next(
            (SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None
        )
        if arch is None:
            model_type = raw.get("model_type")
            arch = model_type if model_type in SUPPORTED_ARCHITECTURES.values() else None
        if arch is None:
            raise ModelConfigError(
                f"architectures: {archs or raw.get('model_type')!r} is not one of "
                f"{sorted(SUPPORTED_ARCHITECTURES)}"
            )
        scaling = raw.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise ModelConfigError(f"rope_scaling: {scaling!r} is not supported yet")
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            if not isinstance(raw.get(key), int) or raw[key] <= 0:
                raise ModelConfigError(f"{key}: expected a positive int, got {raw.get(key)!r}")
        heads = raw["num_attention_heads"]
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        rope = raw.get("rope_parameters") or {}
        return cls(
            architecture=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(raw.get("rope_theta", rope.get("rope_theta", 10000.0))),
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", arch == "qwen2")),
            eos_token_ids=eos_ids,
            bos_token_id=raw.get("bos_token_id"),
            torch_dtype=str(raw.get("torch_dtype", raw.get("dtype", "float32"))),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise ModelConfigError(f"model_path: no config.json in {str(path)!r}")
        try:
            raw = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelConfigError(f"config.json: not valid JSON ({exc})") from exc
        return cls.from_hf_dict(raw)

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers loads as the same architecture."""
        out = {
            k: v
            for k, v in asdict(self).items()
            if k not in ("architecture", "eos_token_ids", "extra", "torch_dtype")
        }
        out["architectures"] = [self.hf_architecture]
        out["model_type"] = self.architecture
        out["hidden_act"] = "silu"
        out["eos_token_id"] = (
            list(self.eos_token_ids)
            if len(self.eos_token_ids) > 1
            else (self.eos_token_ids[0] if self.eos_token_ids else None)
        )
        out["torch_dtype"] = self.torch_dtype
        out["use_cache"] = True
        if self.architecture == "qwen2":
            out["use_sliding_window"] = False
        return out
