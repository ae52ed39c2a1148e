"""One GRPO optimizer step on a batch of groups: advantages, micro-batched backward, AdamW.

Single update per rollout batch, so the PPO ratio is taken against the rollout logprobs (slime's
`--use-rollout-logprobs`): it is 1 except where the engine and trainer disagree or tokens came
from an older policy (partial rollouts), which is exactly what the clip is for.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rollout_accel.rollout.trainer.grpo import group_advantages, policy_loss
from rollout_accel.rollout.trainer.sequence_logprobs import pack_batch, response_logprobs
from rollout_accel.rollout.trainer.types import TrainSample


@dataclass(frozen=True, slots=True)
class GRPOConfig:
    """Optimizer, loss and batching settings of `GRPOTrainer`.

    `temperature` must be the rollout temperature (logprobs are of the sampled distribution).
    `micro_batch_tokens` bounds padded tokens (batch x length) per forward, hence activation
    memory; a sample longer than that still runs alone. With `skip_zero_advantage`, samples
    whose advantage is 0 are not forwarded when no KL/entropy term needs them: their gradient is
    exactly zero, and they still count in the token normaliser as in slime.
    """

    # Tuned for tiny local models, not slime's billion-parameter ones: on arithmetic with the
    # 2-layer test Qwen3, 3e-4 kept improving eval accuracy while 1e-3 collapsed the policy.
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    temperature: float = 1.0
    normalize_std: bool = True
    advantage_eps: float = 1e-6
    micro_batch_tokens: int = 4096
    skip_zero_advantage: bool = True
    pad_id: int = 0

    def __post_init__(self) -> None:
        checks = {
            "lr": self.lr > 0,
            "max_grad_norm": self.max_grad_norm > 0,
            "weight_decay": self.weight_decay >= 0,
            "adam_eps": self.adam_eps > 0,
            "clip_low": 0 <= self.clip_low < 1,
            "clip_high": self.clip_high >= 0,
            "kl_coef": self.kl_coef >= 0,
            "entropy_coef": self.entropy_coef >= 0,
            "temperature": self.temperature > 0,
            "advantage_eps": self.advantage_eps > 0,
            "micro_batch_tokens": isinstance(self.micro_batch_tokens, int)
            and self.micro_batch_tokens >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ValueError(
                f"GRPOConfig: invalid {values} (need lr, max_grad_norm, adam_eps, temperature, "
                "advantage_eps > 0; weight_decay, clip_high, kl_coef, entropy_coef >= 0; "
                "0 <= clip_low < 1; micro_batch_tokens an int >= 1)"
            )


class GRPOTrainer:
    """Owns the policy's optimizer (and, with a KL term, a frozen reference policy).

    `model(input_ids [B, T])` must return logits `[B, T, V]`. The reference defaults to a copy of
    the model as it is when the trainer is built.
    """

    def __init__(
        self, model: nn.Module, config: GRPOConfig | None = None, ref_model: nn.Module | None = None
    ) -> None:
        self.model = model
        self.config = config if config is not None else GRPOConfig()
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("GRPOTrainer: the model has no trainable parameters")
        self.device = self.params[0].device
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=self.config.lr,
            betas=self.config.betas,
            eps=self.config.adam_eps,
            weight_decay=self.config.weight_decay,
        )
        self.ref_model: nn.Module | None = None
        if self.config.kl_coef > 0:
            self.ref_model = ref_model if ref_model is not None else copy.deepcopy(model)
            self.ref_model.eval().requires_grad_(False)

    def train_step(self, batch: Sequence[Sequence[TrainSample]]) -> dict[str, float]:
        """One optimizer step on `batch` (a list of groups, each the responses to one prompt)."""
        self.optimizer.zero_grad(set_to_none=True)
        metrics = self.backward(batch)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics["grad_norm"] = float(grad_norm)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        return metrics

    def backward(self, batch: Sequence[Sequence[TrainSample]]) -> dict[str, float]:
        """Accumulate the batch's loss gradient into `.grad` (no optimizer step); returns metrics.

        The gradient does not depend on how the batch is split into micro-batches.
        """
        cfg = self.config
        samples, advantages, group_metrics = self._flatten(batch)
        num_tokens = sum(sum(s.loss_mask) for s in samples)
        normalizer = float(max(num_tokens, 1))
        needs_all = cfg.kl_coef > 0 or cfg.entropy_coef > 0 or not cfg.skip_zero_advantage
        chosen = [i for i in range(len(samples)) if needs_all or advantages[i] != 0.0]
        chosen = [i for i in chosen if sum(samples[i].loss_mask) > 0]
        forwarded_tokens = sum(sum(samples[i].loss_mask) for i in chosen)

        sums: dict[str, float] = {}
        self.model.train()
        for micro in self._micro_batches(samples, chosen):
            metrics = self._micro_backward(
                [samples[i] for i in micro], [advantages[i] for i in micro], normalizer
            )
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + value

        out = {"loss": sums.get("loss", 0.0), "pg_loss": sums.get("pg_loss", 0.0)}
        if self.ref_model is not None:
            out["kl_loss"] = sums.get("kl_loss", 0.0)
        # Diagnostics describe the tokens actually forwarded, not the skipped zero-advantage ones;
        # with none forwarded they are undefined and left out.
        if forwarded_tokens > 0:
            for name in ("pg_clipfrac", "ppo_kl", "entropy_loss"):
                out[name] = sums[name] * normalizer / forwarded_tokens
        out.update(group_metrics)
        out["num_tokens"] = float(num_tokens)
        out["forwarded_samples"] = float(len(chosen))
        return out

    def _flatten(
        self, batch: Sequence[Sequence[TrainSample]]
    ) -> tuple[list[TrainSample], list[float], dict[str, float]]:
        if len(batch) == 0:
            raise ValueError("GRPOTrainer: empty batch")
        samples: list[TrainSample] = []
        advantages: list[float] = []
        zero_std = 0
        for g, group in enumerate(batch):
            if isinstance(group, TrainSample) or len(group) == 0:
                raise ValueError(
                    f"GRPOTrainer: batch[{g}] must be a non-empty list of TrainSample (one group)"
                )
            for s in group:
                if not isinstance(s, TrainSample):
                    raise ValueError(
                        f"GRPOTrainer: batch[{g}] holds a {type(s).__name__}, not a TrainSample"
                    )
            rewards = torch.tensor([[s.reward for s in group]], dtype=torch.float32)
            adv = group_advantages(rewards, self.config.normalize_std, self.config.advantage_eps)[0]
            zero_std += int(bool((rewards == rewards[0, 0]).all()))
            samples.extend(group)
            advantages.extend(adv.tolist())
        total_response = sum(len(s.response_ids) for s in samples)
        masked_out = sum(len(s.loss_mask) - sum(s.loss_mask) for s in samples)
        metrics = {
            "reward_mean": sum(s.reward for s in samples) / len(samples),
            "advantage_abs_mean": sum(abs(a) for a in advantages) / len(advantages),
            "zero_std_group_fraction": zero_std / len(batch),
            "response_len_mean": total_response / len(samples),
            "masked_token_fraction": masked_out / max(total_response, 1),
            "num_samples": float(len(samples)),
        }
        return samples, advantages, metrics

    def _micro_batches(self, samples: list[TrainSample], chosen: list[int]) -> list[list[int]]:
        """Index lists whose padded size (count x longest) stays within `micro_batch_tokens`."""

        def length(i: int) -> int:
            return len(samples[i].prompt_ids) + len(samples[i].response_ids)

        # Longest first: the first sample of each micro-batch sets its padded length, and
        # similar lengths share a micro-batch, so little is spent on padding.
        micros: list[list[int]] = []
        for i in sorted(chosen, key=length, reverse=True):
            if (
                micros
                and (len(micros[-1]) + 1) * length(micros[-1][0]) <= self.config.micro_batch_tokens
            ):
                micros[-1].append(i)
            else:
                micros.append([i])
        return micros

    def _micro_backward(
        self, samples: list[TrainSample], advantages: list[float], normalizer: float
    ) -> dict[str, float]:
        cfg = self.config
        packed = pack_batch(
            [s.prompt_ids for s in samples],
            [s.response_ids for s in samples],
            cfg.pad_id,
            self.device,
        )
        shape = packed.response_mask.shape
        old = torch.zeros(shape, dtype=torch.float32)
        mask = torch.zeros(shape, dtype=torch.bool)
        for row, s in enumerate(samples):
            n = len(s.response_ids)
            old[row, :n] = torch.tensor(s.rollout_logprobs, dtype=torch.float32)
            mask[row, :n] = torch.tensor(s.loss_mask, dtype=torch.bool)
        old, mask = old.to(self.device), mask.to(self.device)
        adv = torch.tensor(advantages, dtype=torch.float32, device=self.device)

        logprobs, entropy = response_logprobs(
            self.model, packed, cfg.temperature, with_entropy=True
        )
        ref = None
        if self.ref_model is not None:
            with torch.no_grad():
                ref, _ = response_logprobs(self.ref_model, packed, cfg.temperature)
        assert entropy is not None
        loss, metrics = policy_loss(
            logprobs,
            old,
            adv,
            mask,
            clip_low=cfg.clip_low,
            clip_high=cfg.clip_high,
            kl_coef=cfg.kl_coef,
            ref_logprobs=ref,
            entropy=entropy if cfg.entropy_coef > 0 else entropy.detach(),
            entropy_coef=cfg.entropy_coef,
            normalizer=normalizer,
        )
        loss.backward()
        return metrics
