"""Builds a model + tokenizer from a preset name or an HF-layout directory; writes HF layout."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rollout_accel.serving.models.config import ModelConfig, ModelConfigError
from rollout_accel.serving.models.decoder import CausalLM, RotaryEmbedding
from rollout_accel.serving.models.presets import PRESETS, init_random_weights, preset_names
from rollout_accel.serving.models.tokenizer import TextTokenizer

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class ModelLoadError(ValueError):
    """The model path, preset or weights cannot be used; the message names what is wrong."""


@dataclass
class LoadedModel:
    model: CausalLM
    tokenizer: TextTokenizer
    config: ModelConfig
    source: str


def resolve_dtype(
    dtype: str | torch.dtype | None, config: ModelConfig, device: torch.device
) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        # bf16 on GPUs; float32 on the CPU, where bf16 matmuls are slow and less exact.
        return (
            DTYPES.get(config.torch_dtype, torch.bfloat16)
            if device.type == "cuda"
            else torch.float32
        )
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype: {dtype!r} is not one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def _allocate(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> CausalLM:
    """The model with uninitialised parameters of `dtype` on `device` (tied head re-tied)."""
    with torch.device("meta"):
        model = CausalLM(config).to(dtype)
    model = model.to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty gives each module its own tensor
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def load_model(
    model_path: str,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> LoadedModel:
    """A preset name (`tiny-qwen3`, ...) or a directory with config.json, *.safetensors and
    tokenizer.json."""
    device = torch.device(device)
    if model_path in PRESETS:
        preset = PRESETS[model_path]
        config = preset.config
        torch_dtype = resolve_dtype(dtype, config, device)
        # Built on meta and allocated once on `device` (no default init, no host copy of a
        # multi-GB model). Presets keep the rotary frequencies in the model dtype, as they always
        # had (the stages of a pipeline mirror it).
        model = _allocate(config, device, torch_dtype)
        inv_freq = RotaryEmbedding(config.head_dim, config.rope_theta).inv_freq
        model.model.rotary.inv_freq = inv_freq.to(device=device, dtype=torch_dtype)
        gen_device = device if preset.init_on_device else torch.device("cpu")
        init_random_weights(model, preset.init_std, seed, device=gen_device)
        return LoadedModel(
            model.eval(), TextTokenizer.byte_level(config.vocab_size), config, model_path
        )
    path = Path(model_path)
    if not path.is_dir():
        raise ModelLoadError(
            f"model_path: {model_path!r} is neither a directory nor a preset ({', '.join(preset_names())})"
        )
    try:
        config = ModelConfig.from_dir(path)
    except ModelConfigError as exc:
        raise ModelLoadError(str(exc)) from exc
    torch_dtype = resolve_dtype(dtype, config, device)
    model = _allocate(config, device, torch_dtype)
    # Buffers (rotary tables) were created on meta; rebuild them on the real device.
    model.model.rotary.inv_freq = 1.0 / (
        config.rope_theta
        ** (
            torch.arange(0, config.head_dim, 2, dtype=torch.int64, device=device).float()
            / config.head_dim
        )
    )
    load_weights_from_dir(model, path)
    from rollout_accel.serving.models.tokenizer import TextTokenizer as _Tok

    return LoadedModel(model.eval(), _Tok.from_dir(path), config, str(path))


def iter_safetensors(path: Path):
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"model_path: no *.safetensors files in {str(path)!r}")
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield name, handle.get_tensor(name)


@torch.no_grad()
def load_named_tensors(
    model: CausalLM, named: list[tuple[str, torch.Tensor]] | object, strict_all: bool = False
) -> int:
    """Copies tensors into parameters by HF name, checking every name and shape first.

    Raises ModelLoadError naming the first unknown name or mismatched shape; nothing is copied in
    that case. Returns how many parameters were written.
    """
    items = [(n, t) for n, t in named if not n.endswith(_IGNORED_SUFFIXES)]
    targets = []
    for name, tensor in items:
        try:
            param = model.parameter_by_name(name)
        except KeyError:
            raise ModelLoadError(f"weights: unknown parameter name {name!r}") from None
        if tuple(param.shape) != tuple(tensor.shape):
            raise ModelLoadError(
                f"weights: {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}"
            )
        targets.append((param, tensor))
    if strict_all:
        given = {n for n, _ in items}
        if model.config.tie_word_embeddings:
            given.add("lm_head.weight")
        missing = [n for n, _ in model.named_parameters() if n not in given]
        if missing:
            raise ModelLoadError(f"weights: missing parameters, e.g. {missing[:3]}")
    for param, tensor in targets:
        param.copy_(tensor.to(device=param.device, dtype=param.dtype))
    return len(targets)


def load_weights_from_dir(model: CausalLM, path: Path) -> int:
    return load_named_tensors(model, list(iter_safetensors(path)), strict_all=True)


def save_model_dir(loaded: LoadedModel, path: str | Path) -> Path:
    """Writes config.json, model.safetensors and tokenizer files: an HF-layout directory that both
    `load_model` and transformers' `from_pretrained` read."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = loaded.config
    hf = config.to_hf_dict()
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    hf["torch_dtype"] = dtype_name.get(next(loaded.model.parameters()).dtype, "float32")
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    state = {
        name: tensor.detach().to("cpu").contiguous()
        for name, tensor in loaded.model.state_dict().items()
        if not (config.tie_word_embeddings and name == "lm_head.weight")
    }
    save_file(state, str(path / "model.safetensors"))
    loaded.tokenizer.save(path)
    return path


def materialize_preset(name: str, path: str | Path, seed: int = 0) -> Path:
    """Writes a preset as an HF-layout directory (for transformers comparisons, disk updates)."""
    return save_model_dir(load_model(name, dtype="float32", seed=seed), path)
