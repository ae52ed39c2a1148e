"""Per-token logprobs of response tokens under a causal LM, for a right-padded batch.

Model contract: `model(input_ids: LongTensor[B, T])` returns logits `[B, T, V]` (or an object with
`.logits`, as Hugging Face models do). Batches are right-padded, so a causal model needs no
attention mask: real positions never attend to the padding after them, and position ids are the
same as for the unpadded sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, slots=True)
class PackedBatch:
    """`B` sequences `prompt + response`, right-padded.

    `input_ids [B, T]`; `prompt_lens [B]`; `response_mask [B, R]` is 1 for the real response
    tokens (R = longest response) and 0 for padding; `response_ids [B, R]` (pad where masked).
    """

    input_ids: torch.Tensor
    prompt_lens: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor


def pack_batch(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int = 0,
    device: torch.device | str | None = None,
) -> PackedBatch:
    """Right-pad `prompt + response` pairs into one batch. Prompts must be non-empty."""
    if len(prompts) != len(responses):
        raise ValueError(f"pack_batch: {len(prompts)} prompts but {len(responses)} responses")
    if len(prompts) == 0:
        raise ValueError("pack_batch: empty batch")
    if any(len(p) == 0 for p in prompts):
        raise ValueError(
            "pack_batch: every prompt needs at least one token to predict the response from"
        )
    batch = len(prompts)
    total = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    longest = max(1, max(len(r) for r in responses))
    input_ids = torch.full((batch, total), pad_id, dtype=torch.long)
    response_ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    response_mask = torch.zeros((batch, longest), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        input_ids[i, : len(p) + len(r)] = torch.tensor(list(p) + list(r), dtype=torch.long)
        if r:
            response_ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
            response_mask[i, : len(r)] = True
    prompt_lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return PackedBatch(
        input_ids=input_ids.to(device),
        prompt_lens=prompt_lens.to(device),
        response_ids=response_ids.to(device),
        response_mask=response_mask.to(device),
    )


def logits_of(output: object) -> torch.Tensor:
    """The logits tensor of a model call: the output itself or its `.logits`."""
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise TypeError(
            "model(input_ids) must return logits [B, T, V] (a tensor or an object with .logits), "
            f"got {type(output).__name__}"
            + (f" with shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else "")
        )
    return logits


def response_logprobs(
    model: nn.Module,
    batch: PackedBatch,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprobs `[B, R]` of the response tokens (0 where masked), and optionally their entropy.

    Logits are divided by `temperature` before the softmax, as slime does with the rollout
    temperature, so the logprobs are those of the distribution the engine sampled from. Gradients
    flow to the model; call under `torch.no_grad()` for reference/old-policy logprobs.
    """
    if not temperature > 0:
        raise ValueError(f"response_logprobs: temperature must be > 0, got {temperature!r}")
    try:
        output = model(batch.input_ids)
    except IndexError as err:
        # What an embedding lookup raises for an id past the vocabulary; say which id.
        raise ValueError(
            f"model failed on the batch (largest token id {int(batch.input_ids.max())}): "
            f"a token id is likely outside the model's vocabulary: {err}"
        ) from err
    logits = logits_of(output)
    b, t = batch.input_ids.shape
    if logits.shape[:2] != (b, t):
        raise ValueError(f"model returned logits {tuple(logits.shape)} for input_ids {(b, t)}")
    vocab = logits.shape[-1]
    if int(batch.input_ids.max()) >= vocab:
        raise ValueError(
            f"token id {int(batch.input_ids.max())} is outside the model's vocabulary of {vocab}"
        )
    r = batch.response_ids.shape[1]
    # Response token j of sample i sits at position prompt_len_i + j and is predicted by the
    # logits one position earlier. Padding slots are clamped to a valid index and masked below.
    offsets = torch.arange(r, device=logits.device)
    positions = (batch.prompt_lens[:, None] - 1 + offsets[None, :]).clamp(max=t - 1)
    picked = logits.gather(1, positions[:, :, None].expand(b, r, vocab)).float()
    if temperature != 1.0:
        picked = picked / temperature
    log_probs = F.log_softmax(picked, dim=-1)
    token_logprobs = log_probs.gather(-1, batch.response_ids[:, :, None]).squeeze(-1)
    token_logprobs = token_logprobs.masked_fill(~batch.response_mask, 0.0)
    entropy = None
    if with_entropy:
        entropy = -(log_probs.exp() * log_probs).sum(-1).masked_fill(~batch.response_mask, 0.0)
    return token_logprobs, entropy
