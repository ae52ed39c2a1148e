"""Quality of reused KV against full prefill of the same prompt.

Three measures per prompt (the reference is full prefill, radix cache on, no chunk reuse):
  * KL(full || reuse) of the next-token distribution at the last prompt position (nats);
  * top-1 agreement at that position;
  * greedy continuation agreement: both KVs decode up to `steps` greedy tokens (stopping after an
    end-of-sequence token); the score is the length of their common prefix / the longer one's
    length (1.0: identical continuations; a position-wise match rate would keep counting after
    the continuations diverged, which says nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rollout_accel.serving.models.decoder import CausalLM
from rollout_accel.serving.models.paged_kv import AttentionMetadata, PagedKVCache


@dataclass(frozen=True, slots=True)
class QualityRecord:
    kl: float
    top1_agree: bool
    greedy_agreement: float  # common prefix / steps
    greedy_exact: bool


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(softmax(ref) || softmax(logits)) in nats, float64."""
    ref_lp = torch.log_softmax(ref_logits.double(), dim=-1)
    lp = torch.log_softmax(logits.double(), dim=-1)
    return float((ref_lp.exp() * (ref_lp - lp)).sum().clamp_min(0.0))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def compare(
    ref_logits: torch.Tensor,
    ref_tokens: Sequence[int],
    logits: torch.Tensor,
    tokens: Sequence[int],
) -> QualityRecord:
    steps = max(len(ref_tokens), len(tokens), 1)
    agree = common_prefix(ref_tokens, tokens)
    return QualityRecord(
        kl=kl_divergence(ref_logits, logits),
        top1_agree=int(ref_logits.argmax()) == int(logits.argmax()),
        greedy_agreement=agree / steps,
        greedy_exact=agree == len(ref_tokens) == len(tokens),
    )


def summarize(records: Sequence[QualityRecord]) -> dict[str, float]:
    """Means over prompts (and the worst KL)."""
    if not records:
        return {}
    n = len(records)
    kls = sorted(r.kl for r in records)
    return {
        "prompts": n,
        "kl_mean": sum(kls) / n,
        "kl_p50": kls[n // 2],
        "kl_max": kls[-1],
        "top1_agreement": sum(r.top1_agree for r in records) / n,
        "greedy_agreement": sum(r.greedy_agreement for r in records) / n,
        "greedy_exact": sum(r.greedy_exact for r in records) / n,
    }


@torch.inference_mode()
def greedy_decode(
    model: CausalLM,
    cache: PagedKVCache,
    slots: torch.Tensor,
    first_logits: torch.Tensor,
    steps: int,
    alloc: Callable[[int], torch.Tensor],
    free: Callable[[torch.Tensor], None],
    stop_ids: Sequence[int] = (),
) -> list[int]:
    """Up to `steps` greedy tokens continuing a prompt whose KV is in `slots` (ending after the
    first of `stop_ids`); the decode slots are taken from `alloc` and given back to `free`."""
    dev = cache.k[0].device
    token = int(first_logits.argmax())
    out = [token]
    own: list[torch.Tensor] = []
    table = slots.to(dev, torch.int32)
    stops = set(stop_ids)
    try:
        for _ in range(steps - 1):
            if token in stops:
                break
            slot = alloc(1)
            own.append(slot)
            table = torch.cat([table, slot.to(dev, torch.int32)])
            length = table.numel()
            meta = AttentionMetadata(
                slot_mapping=slot.to(dev),
                block_table=table[None, :],
                seq_lens=torch.tensor([length], dtype=torch.int32, device=dev),
                cu_q_lens=torch.tensor([0, 1], dtype=torch.int32, device=dev),
                page_size=1,
                is_decode=True,
                num_decode=1,
            )
            logits = model.forward_paged(
                torch.tensor([token], device=dev),
                torch.tensor([length - 1], device=dev),
                meta,
                cache,
                max_position=length - 1,
            )
            token = int(logits[0].argmax())
            out.append(token)
    finally:
        for slot in own:
            free(slot)
    return out
