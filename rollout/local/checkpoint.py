"""The tiny policy of a local run: build it, warm-start it with SFT, cache it as an HF-layout dir.

The model is a Qwen3-shaped `CausalLM` whose vocabulary is exactly the task's `CharTokenizer`
and whose directory carries that tokenizer as `tokenizer.json`, so the engine decodes responses
to the same text the task's reward reads. The SFT checkpoint is cached under
`<cache_root>/<task>-h<hidden>-l<layers>-sft<steps>-seed<seed>-<hash>/`, keyed by everything
that changes its weights, so repeated runs, policies and seeds of one recipe reuse it.
Invariant: a cache directory exists only complete (it is built elsewhere and renamed in).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from rollout_accel.rollout.recipe import Recipe
from rollout_accel.rollout.tasks import Task, get_task
from rollout_accel.rollout.trainer import SFTConfig, build_sft_examples, sft_train
from rollout_accel.serving.models import (
    CausalLM,
    LoadedModel,
    ModelConfig,
    TextTokenizer,
    load_model,
    save_model_dir,
)
from rollout_accel.serving.models.presets import init_random_weights

# HF's Qwen3 initializer_range; the previous offline check of SFT + GRPO used this init.
INIT_STD = 0.02
# SFT problems come from the train split under a seed stream disjoint from the RL prompts'
# (`Task` draws each (split, seed) pair from its own stream).
SFT_SEED_OFFSET = 1_000_003
SFT_META = "sft.json"


def staging_dir(parent: Path, prefix: str) -> Path:
    """A fresh hidden directory in `parent` to build outputs in before renaming them into place.

    `mkdtemp` makes it owner-only; it gets the usual umask-derived mode, since it becomes a
    normal output directory once renamed.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)
    return path


def model_config(recipe: Recipe, task: Task) -> ModelConfig:
    """The decoder's shape: the recipe's size, the task tokenizer's vocabulary and specials."""
    spec = recipe.model
    tok = task.tokenizer
    return ModelConfig(
        architecture="qwen3",
        vocab_size=tok.vocab_size,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.hidden // spec.heads,
        rope_theta=10_000.0,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        eos_token_ids=(tok.eos_id,),
        bos_token_id=tok.bos_id,
    )


def build_model(recipe: Recipe, task: Task) -> CausalLM:
    """A freshly initialised model, seeded by `run.seed` (same seed -> same weights)."""
    model = CausalLM(model_config(recipe, task))
    init_random_weights(model, INIT_STD, recipe.run.seed)
    return model


def save_policy_dir(model: CausalLM, task: Task, path: str | Path) -> Path:
    """Writes `model` with the task's tokenizer as an HF-layout directory the Engine loads."""
    path = Path(path)
    hf_tok = TextTokenizer(task.tokenizer.to_hf())
    save_model_dir(LoadedModel(model, hf_tok, model.config, "local"), path)
    # save_model_dir writes a ChatML-style tokenizer_config; ours names the char specials.
    task.tokenizer.save_hf(path)
    return path


def sft_cache_key(recipe: Recipe) -> dict[str, object]:
    """Everything the SFT checkpoint's weights depend on."""
    return {
        "task": recipe.task.name,
        "options": dict(sorted(recipe.task.options.items())),
        "sft_size": recipe.task.sft_size,
        "model": asdict(recipe.model),
        "sft_steps": recipe.train.sft_steps,
        "sft_lr": recipe.train.sft_lr,
        "sft_batch_size": recipe.train.sft_batch_size,
        "seed": recipe.run.seed,
        "init_std": INIT_STD,
        "vocab": list(get_task(recipe.task.name).tokenizer.vocab),
    }


def sft_cache_dir(recipe: Recipe, cache_root: str | Path) -> Path:
    key = sft_cache_key(recipe)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    m = recipe.model
    name = (
        f"{recipe.task.name}-h{m.hidden}-l{m.layers}-sft{recipe.train.sft_steps}"
        f"-seed{recipe.run.seed}-{digest}"
    )
    return Path(cache_root) / name


def ensure_sft_checkpoint(recipe: Recipe, cache_root: str | Path) -> tuple[Path, dict]:
    """The SFT warm-start directory for `recipe` (built on a miss); returns (dir, its sft.json).

    `sft.json` holds the cache key, the SFT loss curve, and whether this call built it.
    """
    target = sft_cache_dir(recipe, cache_root)
    meta_file = target / SFT_META
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        meta["cached"] = True
        return target, meta
    task = get_task(recipe.task.name, **recipe.task.options)
    model = build_model(recipe, task)
    start = time.perf_counter()
    losses: list[float] = []
    if recipe.train.sft_steps > 0:
        problems = task.train_prompts(recipe.task.sft_size, seed=recipe.run.seed + SFT_SEED_OFFSET)
        losses = sft_train(
            model,
            build_sft_examples(task, problems),
            SFTConfig(
                steps=recipe.train.sft_steps,
                batch_size=recipe.train.sft_batch_size,
                lr=recipe.train.sft_lr,
                pad_id=task.tokenizer.pad_id,
                seed=recipe.run.seed,
            ),
        )
    meta = {
        "key": sft_cache_key(recipe),
        "losses": losses,
        "seconds": time.perf_counter() - start,
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(target.parent, f".{target.name}.")
    try:
        save_policy_dir(model.eval(), task, staging)
        (staging / SFT_META).write_text(json.dumps(meta))
        try:
            os.rename(staging, target)
        except OSError:
            if not meta_file.is_file():  # not another process's finished copy: a real failure
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    meta["cached"] = False
    return target, meta


def load_policy(path: str | Path) -> CausalLM:
    """The trainable float32 policy from an HF-layout directory (train mode, grads on)."""
    model = load_model(str(path), dtype="float32", device="cpu").model
    model.train()
    model.requires_grad_(True)
    return model


def named_weights(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """What a weight push sends: every parameter by HF name, detached (tied ones once)."""
    return [(name, param.detach()) for name, param in model.named_parameters()]
