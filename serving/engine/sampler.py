"""Next-token sampling for a batch of rows: per-row parameters in, tokens and logprobs out.

Draws are seeded by (request seed, output position), so a token never depends on which other
requests share the batch, and an overlapped step samples exactly what a synchronous one would.
Each row's parameters live on the device (`RequestTable.row_floats` / `row_ints`, written once
when the request takes its row), so a decode step moves no sampling parameters at all. Only
penalties need host-side output history; the scheduler never overlaps a step for those.
"""

from __future__ import annotations

import numpy as np
import torch

from rollout_accel.kernels.sampling import apply_penalties, sample_tokens_fast
from rollout_accel.serving.engine.grammar import apply_grammars
from rollout_accel.serving.engine.kv_pool import RequestTable
from rollout_accel.serving.engine.logprob_options import record_output
from rollout_accel.serving.engine.request import Request


class BatchSampler:
    """Samples one token per row of `logits` for the given requests."""

    def __init__(self, table: RequestTable, vocab_size: int, eos_ids: tuple[int, ...]) -> None:
        self.table = table
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids

    def sample(
        self,
        requests: list[Request],
        logits: torch.Tensor,
        rows: torch.Tensor,
        next_positions: torch.Tensor,
        host_output_positions: np.ndarray,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [B] int64 and logprobs [B] float32 as device tensors (no host sync).

        `rows` / `next_positions` (device): each row's table row and the sequence position of
        the token being sampled; `host_output_positions`: the same as output positions, on the
        host (for min-length bans).
        """
        params = [r.params for r in requests]
        if any(p.has_penalties for p in params):
            logits = self._penalize(requests, logits)
        if any(p.min_new_tokens for p in params):
            self._ban_early_stops(requests, logits, host_output_positions)
        if any(r.grammar is not None for r in requests):
            logits = logits.float()
            apply_grammars(requests, logits)
        record_output(requests, logits, host_output_positions)
        if logits.device.type != "cuda" and all(p.greedy for p in params):
            logits = logits.float()
            tokens = torch.argmax(logits, dim=-1)
            logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
            return tokens, logprobs
        floats = self.table.row_floats[rows]
        ints = self.table.row_ints[rows]
        vocab = self.vocab_size
        need_filter = any((0 < p.top_k < vocab) or p.top_p < 1.0 or p.min_p > 0.0 for p in params)
        return sample_tokens_fast(
            logits,
            floats[:, 0],
            ints[:, 0],
            floats[:, 1],
            floats[:, 2],
            ints[:, 1],
            next_positions - ints[:, 2],
            need_filter=need_filter,
        )

    def _penalize(self, requests: list[Request], logits: torch.Tensor) -> torch.Tensor:
        dev = logits.device
        logits = logits.float()
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
