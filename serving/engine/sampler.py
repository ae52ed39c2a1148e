"""Next-token sampling for a batch of rows: per-row parameters in, tokens and logprobs out.

Draws are seeded by (request seed, output position), so a token never depends on which other
requests share the batch, and an overlapped step samples exactly what a synchronous one would.
The output position is passed in by the runner (it knows each row's sequence position), so the
sampler needs no host-side output history — except for penalties and `min_new_tokens` bans, which
the scheduler only schedules when the history is on the host.
"""

from __future__ import annotations

import numpy as np
import torch

from rollout_accel.kernels.sampling import apply_penalties, sample_tokens_fast
from rollout_accel.serving.engine.request import Request


class BatchSampler:
    """Samples one token per row of `logits` for the given requests."""

    def __init__(self, vocab_size: int, eos_ids: tuple[int, ...], device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self.device = device

    def sample(
        self, requests: list[Request], logits: torch.Tensor, output_positions: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [B] int64 and logprobs [B] float32 as device tensors (no host sync).

        `output_positions[i]`: how many output tokens row i's request has before the sampled one.
        """
        dev = logits.device
        params = [r.params for r in requests]
        if any(p.has_penalties for p in params):
            logits = self._penalize(requests, logits)
        self._ban_early_stops(requests, logits, output_positions)
        floats = np.array(
            [(0.0 if p.greedy else p.temperature, p.top_p, p.min_p) for p in params],
            dtype=np.float32,
        )
        ints = np.array([(p.top_k, r.seed) for p, r in zip(params, requests, strict=True)])
        steps = torch.from_numpy(np.ascontiguousarray(output_positions, dtype=np.int64))
        if all(p.greedy for p in params) and dev.type != "cuda":
            tokens = torch.argmax(logits, dim=-1)
            logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
            return tokens, logprobs
        floats_t = torch.from_numpy(floats)
        ints_t = torch.from_numpy(
            np.concatenate([ints.astype(np.int64), steps.numpy()[:, None]], 1)
        )
        if dev.type == "cuda":
            floats_t = floats_t.pin_memory().to(dev, non_blocking=True)
            ints_t = ints_t.pin_memory().to(dev, non_blocking=True)
        vocab = self.vocab_size
        need_filter = any((0 < p.top_k < vocab) or p.top_p < 1.0 or p.min_p > 0.0 for p in params)
        return sample_tokens_fast(
            logits,
            floats_t[:, 0],
            ints_t[:, 0],
            floats_t[:, 1],
            floats_t[:, 2],
            ints_t[:, 1],
            ints_t[:, 2],
            need_filter=need_filter,
        )

    def _penalize(self, requests: list[Request], logits: torch.Tensor) -> torch.Tensor:
        dev = logits.device
        counts = torch.zeros_like(logits)
        for row, req in enumerate(requests):
            if req.params.has_penalties and req.output_ids:
                out = torch.tensor(req.output_ids, device=dev)
                counts[row].index_add_(0, out, torch.ones(len(out), device=dev))
        params = [r.params for r in requests]
        return apply_penalties(
            logits,
            counts,
            torch.tensor([p.frequency_penalty for p in params], device=dev),
            torch.tensor([p.presence_penalty for p in params], device=dev),
            torch.tensor([p.repetition_penalty for p in params], device=dev),
        )

    def _ban_early_stops(
        self, requests: list[Request], logits: torch.Tensor, output_positions: np.ndarray
    ) -> None:
        for row, req in enumerate(requests):
            if output_positions[row] < req.params.min_new_tokens:
                banned = list(req.params.stop_token_ids)
                if not req.params.ignore_eos:
                    banned += list(self.eos_ids)
                if banned:
                    logits[row, torch.tensor(banned, device=logits.device)] = float("-inf")
