"""GRPO math: group-relative advantages and the PPO-clip policy loss, as slime computes them.

Advantages follow slime's `grpo` estimator with std normalisation: rewards centred on the group
mean, divided by the group's (unbiased) std + eps. The loss follows slime's `compute_policy_loss`
(DAPO clip-higher: separate low/high clip), with k3 KL to a reference and token-level aggregation:
the sum over every unmasked token of the batch divided by their number (`normalizer`), so long
responses weigh by their tokens, as with slime's `--calculate-per-token-loss`.
"""

from __future__ import annotations

import torch


def group_advantages(
    rewards: torch.Tensor, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Advantages `[G, n]` for rewards `[G, n]` (G groups of n responses to one prompt each).

    `(r - mean) / (std + eps)` per group, std unbiased as `torch.std`; without `normalize_std`
    just `r - mean`. Groups whose rewards are all equal (and groups of one) get exactly zero.
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2:
        shape = (
            tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        )
        raise ValueError(f"group_advantages: rewards must be a [groups, n] tensor, got {shape}")
    if rewards.shape[1] == 0:
        raise ValueError("group_advantages: groups must have at least one response")
    if not eps > 0:
        raise ValueError(f"group_advantages: eps must be > 0, got {eps!r}")
    rewards = rewards.float()
    if not torch.isfinite(rewards).all():
        raise ValueError("group_advantages: rewards must be finite")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    # Exact zeros for zero-variance groups: float rounding in the mean must not leak through the
    # division by a tiny std, since those groups carry no signal.
    flat = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    centred = centred.masked_fill(flat, 0.0)
    if not normalize_std or rewards.shape[1] == 1:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    kl_coef: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip loss over response tokens, aggregated per token; returns `(loss, metrics)`.

    All per-token tensors share one shape (e.g. `[B, R]`); `advantages` may also be one value per
    sequence (shape without the last dim). Ratio `exp(logprobs - old_logprobs)` is clipped to
    `[1 - clip_low, 1 + clip_high]`. `loss = pg_loss + kl_coef * kl_loss - entropy_coef * entropy`.
    Tokens with `loss_mask == 0` contribute exactly zero loss and zero gradient, whatever their
    values (even inf/nan). Every term is `sum over unmasked tokens / normalizer`, `normalizer`
    defaulting to the number of unmasked tokens; pass the whole batch's count when micro-batching
    so that micro-batch losses (and metrics) add up to the batch's token mean.

    Metrics (slime names): `loss`, `pg_loss`, `pg_clipfrac`, `ppo_kl` (mean old - new logprob),
    plus `kl_loss` with a reference and `entropy_loss` with entropies.
    """
    shape = logprobs.shape
    if advantages.shape == shape[:-1]:
        advantages = advantages.unsqueeze(-1).expand(shape)
    named = {"old_logprobs": old_logprobs, "advantages": advantages, "loss_mask": loss_mask}
    if ref_logprobs is not None:
        named["ref_logprobs"] = ref_logprobs
    if entropy is not None:
        named["entropy"] = entropy
    for name, tensor in named.items():
        if tensor.shape != shape:
            raise ValueError(
                f"policy_loss: {name} has shape {tuple(tensor.shape)}, logprobs {tuple(shape)}"
            )
    if not 0 <= clip_low < 1:
        raise ValueError(f"policy_loss: clip_low must be in [0, 1), got {clip_low!r}")
    if not clip_high >= 0:
        raise ValueError(f"policy_loss: clip_high must be >= 0, got {clip_high!r}")
    if not kl_coef >= 0 or not entropy_coef >= 0:
        raise ValueError(
            f"policy_loss: kl_coef and entropy_coef must be >= 0, got {kl_coef!r}, {entropy_coef!r}"
        )
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("policy_loss: kl_coef > 0 needs ref_logprobs")
    if entropy_coef > 0 and entropy is None:
        raise ValueError("policy_loss: entropy_coef > 0 needs entropy")

    mask = loss_mask != 0
    count = int(mask.sum())
    if normalizer is None:
        normalizer = float(max(count, 1))
    elif not normalizer > 0:
        raise ValueError(f"policy_loss: normalizer must be > 0, got {normalizer!r}")

    def token_sum(values: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, values, torch.zeros_like(values)).sum() / normalizer

    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    # Select before exp(): torch.where routes no gradient to the unselected branch, so masked
    # tokens with garbage logprobs cannot turn the gradient into 0 * inf = nan.
    log_ratio = torch.where(mask, logprobs - old_logprobs, zero)
    adv = torch.where(mask, advantages.to(logprobs.dtype), zero)
    ratio = log_ratio.exp()
    pg_losses1 = -ratio * adv
    pg_losses2 = -ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    pg_losses = torch.maximum(pg_losses1, pg_losses2)
    clipped = (pg_losses2 > pg_losses1).to(logprobs.dtype)

    pg_loss = token_sum(pg_losses)
    loss = pg_loss
    metrics: dict[str, float] = {
        "pg_loss": float(pg_loss.detach()),
        "pg_clipfrac": float(token_sum(clipped).detach()),
        "ppo_kl": float(token_sum(-log_ratio).detach()),
    }
    if ref_logprobs is not None:
        # k3 estimator of KL(pi || ref): exp(ref - pi) - 1 - (ref - pi); non-negative, unbiased.
        ref_log_ratio = torch.where(mask, ref_logprobs - logprobs, zero)
        kl_loss = token_sum(ref_log_ratio.exp() - 1.0 - ref_log_ratio)
        loss = loss + kl_coef * kl_loss
        metrics["kl_loss"] = float(kl_loss.detach())
    if entropy is not None:
        entropy_loss = token_sum(torch.where(mask, entropy, zero))
        loss = loss - entropy_coef * entropy_loss
        metrics["entropy_loss"] = float(entropy_loss.detach())
    metrics["loss"] = float(loss.detach())
    return loss, metrics
