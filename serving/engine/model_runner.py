"""Turns a scheduled batch into tensors, runs the model over the paged KV cache, samples.

The scheduler hands over `ForwardItem`s (which request, how many of its tokens to compute); the
runner returns, for each item that reached the end of its tokens, the sampled next token and its
logprob (plus prompt logprobs when asked). It knows nothing of queues or finishing rules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rollout_accel.kernels.sampling import apply_penalties, sample_tokens_fast
from rollout_accel.serving.engine.grammar import apply_grammars
from rollout_accel.serving.engine.kv_pool import RequestTable
from rollout_accel.serving.engine.logprob_options import record_input, record_output
from rollout_accel.serving.engine.request import Request
from rollout_accel.serving.models.decoder import CausalLM
from rollout_accel.serving.models.paged_kv import AttentionMetadata, PagedKVCache


@dataclass(slots=True)
class ForwardItem:
    """Compute KV for fill_ids[start:start + count] of `request` into `slots`."""

    request: Request
    start: int
    count: int
    slots: torch.Tensor
    is_prefill: bool = True

    @property
    def samples(self) -> bool:
        return self.start + self.count == self.request.fill_len


@dataclass(slots=True)
class PreparedBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logit_rows: torch.Tensor
    max_len: int
    input_lp_items: list[int]
    rows: list[int]
    seq_lens: list[int]


@dataclass(slots=True)
class StepResult:
    tokens: list[int]  # one per sampling item, in item order
    logprobs: list[float]
    input_logprobs: dict[int, list[float]]  # item index -> logprobs of its prompt tokens computed


class ModelRunner:
    """Owns the model and the KV buffers; one `forward` per scheduler step."""

    def __init__(
        self,
        model: CausalLM,
        kv_cache: PagedKVCache,
        table: RequestTable,
        eos_ids: tuple[int, ...],
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.table = table
        self.device = next(model.parameters()).device
        self.vocab_size = model.config.vocab_size
        self.eos_ids = eos_ids

    @torch.inference_mode()
    def forward(self, items: list[ForwardItem], num_decode: int) -> StepResult:
        """`items`: the first `num_decode` are decode items (one token each), the rest prefill."""
        batch = self.prepare(items, num_decode)
        logits = self.model.forward_paged(
            batch.input_ids,
            batch.positions,
            batch.meta,
            self.kv_cache,
            logit_rows=batch.logit_rows,
            max_position=batch.max_len - 1,
        )
        return self._sample(items, logits, batch.input_lp_items)

    def prepare(self, items: list[ForwardItem], num_decode: int) -> PreparedBatch:
        """Host-side lists -> device tensors (one copy each), and the new tokens' slots written
        into the request table with a single scatter."""
        dev = self.device
        ids: list[int] = []
        positions: list[int] = []
        token_rows: list[int] = []
        cu = [0]
        seq_lens: list[int] = []
        rows: list[int] = []
        logit_rows: list[int] = []
        input_lp_items: list[int] = []
        for index, item in enumerate(items):
            req = item.request
            end = item.start + item.count
            ids.extend(req.token_slice(item.start, end))
            positions.extend(range(item.start, end))
            assert req.row is not None
            token_rows.extend([req.row] * item.count)
            rows.append(req.row)
            seq_lens.append(end)
            if req.logprob_start_len >= 0 and item.start < len(req.input_ids) and item.is_prefill:
                input_lp_items.append(index)
                logit_rows.extend(range(cu[-1], cu[-1] + item.count))
            elif item.samples:
                logit_rows.append(cu[-1] + item.count - 1)
            cu.append(cu[-1] + item.count)
        slots = items[0].slots if len(items) == 1 else torch.cat([item.slots for item in items])
        slot_mapping = slots.to(dev, non_blocking=True)
        positions_t = torch.tensor(positions, dtype=torch.int64).to(dev, non_blocking=True)
        self.table.req_to_token[
            torch.tensor(token_rows, dtype=torch.int64).to(dev, non_blocking=True), positions_t
        ] = slot_mapping.to(torch.int32)
        max_len = max(seq_lens)
        meta = AttentionMetadata(
            slot_mapping=slot_mapping,
            block_table=self.table.req_to_token[
                torch.tensor(rows).to(dev, non_blocking=True), :max_len
            ],
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            cu_q_lens=torch.tensor(cu, dtype=torch.int32).to(dev, non_blocking=True),
            page_size=1,
            is_decode=num_decode == len(items),
            max_q_len=max(item.count for item in items),
            num_decode=num_decode,
        )
        return PreparedBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64).to(dev, non_blocking=True),
            positions=positions_t,
            meta=meta,
            logit_rows=torch.tensor(logit_rows, dtype=torch.int64).to(dev, non_blocking=True),
            max_len=max_len,
            input_lp_items=input_lp_items,
            rows=rows,
            seq_lens=seq_lens,
        )

    def _sample(
        self, items: list[ForwardItem], logits: torch.Tensor, input_lp_items: list[int]
    ) -> StepResult:
        # Split the logit rows: prompt-logprob items contributed all their rows, others one.
        sample_rows: list[int] = []
        sampling: list[Request] = []
        input_logprobs: dict[int, list[float]] = {}
        cursor = 0
        wanted = set(input_lp_items)
        for index, item in enumerate(items):
            if index in wanted:
                rows = logits[cursor : cursor + item.count]
                fill = item.request.fill_ids
                nxt = fill[item.start + 1 : item.start + item.count + 1]
                usable = min(len(nxt), item.count, len(item.request.input_ids) - item.start - 1)
                lp = torch.log_softmax(rows[:usable], dim=-1)
                gathered = lp.gather(1, torch.tensor(nxt[:usable], device=lp.device)[:, None])
                input_logprobs[index] = gathered.squeeze(1).tolist()
                record_input(item.request, lp, item.start + 1)
                if item.samples:
                    sample_rows.append(cursor + item.count - 1)
                    sampling.append(item.request)
                cursor += item.count
            elif item.samples:
                sample_rows.append(cursor)
                sampling.append(item.request)
                cursor += 1
        if not sampling:
            return StepResult([], [], input_logprobs)
        logits = (
            logits[torch.tensor(sample_rows, device=logits.device)]
            if sample_rows != list(range(logits.shape[0]))
            else logits
        )
        tokens, logprobs = self.sample(sampling, logits)
        return StepResult(tokens, logprobs, input_logprobs)

    def sample(
        self, requests: list[Request], logits: torch.Tensor
    ) -> tuple[list[int], list[float]]:
        tokens, logprobs = self.sample_device(requests, logits)
        return tokens.tolist(), logprobs.tolist()

    def sample_device(
        self, requests: list[Request], logits: torch.Tensor, step_offset: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and logprobs as device tensors (no host sync). `step_offset` shifts each
        request's output position (an overlapped step samples one token ahead)."""
        dev = logits.device
        params = [r.params for r in requests]
        if any(p.has_penalties for p in params):
            counts = torch.zeros_like(logits)
            for row, req in enumerate(requests):
                if req.params.has_penalties and req.output_ids:
                    out = torch.tensor(req.output_ids, device=dev)
                    counts[row].index_add_(0, out, torch.ones(len(out), device=dev))
            logits = apply_penalties(
                logits,
                counts,
                torch.tensor([p.frequency_penalty for p in params], device=dev),
                torch.tensor([p.presence_penalty for p in params], device=dev),
                torch.tensor([p.repetition_penalty for p in params], device=dev),
            )
        for row, req in enumerate(requests):
            if len(req.output_ids) < req.params.min_new_tokens:
                banned = list(req.params.stop_token_ids)
                if not req.params.ignore_eos:
                    banned += list(self.eos_ids)
                if banned:
                    logits[row, torch.tensor(banned, device=dev)] = float("-inf")
        apply_grammars(requests, logits, step_offset)
        record_output(requests, logits, step_offset)
        need_filter = any(
            (0 < p.top_k < self.vocab_size) or p.top_p < 1.0 or p.min_p > 0.0 for p in params
        )
        if all(p.greedy for p in params) and logits.device.type != "cuda":
            tokens = torch.argmax(logits, dim=-1)
            logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
        else:
            # One fused pass over the vocabulary on GPUs when no row filters (the RL default).
            tokens, logprobs = sample_tokens_fast(
                logits,
                torch.tensor([0.0 if p.greedy else p.temperature for p in params], device=dev),
                torch.tensor([p.top_k for p in params], device=dev, dtype=torch.int64),
                torch.tensor([p.top_p for p in params], device=dev),
                torch.tensor([p.min_p for p in params], device=dev),
                torch.tensor([r.seed for r in requests], device=dev, dtype=torch.int64),
                torch.tensor(
                    [len(r.output_ids) + step_offset for r in requests],
                    device=dev,
                    dtype=torch.int64,
                ),
                need_filter=need_filter,
            )
        return tokens, logprobs
