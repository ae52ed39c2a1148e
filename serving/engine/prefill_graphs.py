"""Prefill chunks replayed from CUDA graphs (GPU; CPU emulation for tests, see cuda_graphs.py).

Why: a prefill chunk's eager forward launches a few hundred kernels from Python; for small
models and chunks that costs more than the GPU work (on an H200, qwen3-0.6b-shape: a mixed step
as one eager forward took ~3x as long as the same work as two graph replays). The runner replays
a chunk's graph alone (a prefill-only step) or right after the decode graph (a mixed step: its
decode rows and its prefill items as two replays, see `ModelRunner`). SM sharing replays them
on a partition's stream, which must only replay graphs: eager work there allocates from torch's
caching allocators on a green context's stream, and their bookkeeping runs in the primary
context (on the H200 that aborted the process: "invalid device context").

A graph covers a prefill chunk of up to `bucket` tokens in up to `max_items` items: the slot-table
update, the block-table gather, the forward, the logits of the emitting items' last tokens.
Inputs are staged on the caller's (main) stream into static buffers: padding tokens write K/V to
the reserved slot 0 through the table's spare row and belong to no item; padding items have no
tokens (the prefill kernel skips them). Sampling happens outside, on the main stream.
Buckets are fine-grained (`token_buckets`): a chunk computes its whole bucket, so coarse
buckets would waste up to half the compute of a large chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rollout_accel.serving.engine.batch import Batch, host_input_ids, pack_layout
from rollout_accel.serving.engine.cuda_graphs import BucketGraphs
from rollout_accel.serving.engine.kv_pool import RequestTable
from rollout_accel.serving.models.decoder import CausalLM
from rollout_accel.serving.models.paged_kv import AttentionMetadata, PagedKVCache

MAX_ITEMS = 32  # prefill items per graphed chunk; a chunk with more runs eagerly


def token_buckets(max_tokens: int) -> list[int]:
    """Bucket sizes up to the first >= max_tokens: 64, 128, 256, 512, then steps of 128 up to
    1024, of 256 up to 2048, of 512 beyond (padding stays under ~1/4 of a chunk above 512)."""
    buckets = [64]
    while buckets[-1] < max_tokens:
        last = buckets[-1]
        step = last if last < 512 else 128 if last < 1024 else 256 if last < 2048 else 512
        buckets.append(last + step)
    return buckets


@dataclass(slots=True)
class StagedPrefill:
    """A staged chunk: the bucket to replay and, for its emitting items (in item order), their
    index in the chunk, device rows and next positions (for sampling after the replay)."""

    bucket: int
    emitting: list[int]
    emit_rows: torch.Tensor
    emit_next: torch.Tensor


class PrefillGraphs(BucketGraphs):
    """Captured prefill-chunk graphs over static inputs; `stage` on the main stream, `replay`
    on the main stream (or a partition's), `logits` after it. `stream`: where to capture (a
    partition's stream confines the graphs to its SMs; None: a side stream)."""

    capture_error_mode = "global"  # as measured on the H200 (thread_local not tried there)

    def __init__(
        self,
        model: CausalLM,
        kv_cache: PagedKVCache,
        table: RequestTable,
        max_tokens: int,
        stream: torch.cuda.Stream | None = None,
        max_items: int = MAX_ITEMS,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.table = table
        self.stream = stream
        self.device = table.device
        self.width = table.max_context
        self.buckets = token_buckets(max(1, max_tokens))
        self.max_tokens = self.buckets[-1]
        self.max_items = max_items
        self.is_cuda = self.device.type == "cuda"
        self._init_graphs()
        t, p = self.max_tokens, max_items
        # One int64 block: ids, positions, token rows, slots [t each]; cu [p + 1]; seq_lens,
        # item rows, logit rows, emit rows, emit next positions [p each]. One pinned copy a step.
        self._sizes = [t, t, t, t, p + 1, p, p, p, p, p]
        self.static = torch.zeros(sum(self._sizes), dtype=torch.int64, device=self.device)
        views = torch.split(self.static, self._sizes)
        (self.ids, self.positions, self.token_rows, self.slots, self.cu) = views[:5]
        (self.seq_lens, self.item_rows, self.logit_rows, self.emit_rows, self.emit_next) = views[5:]
        hosts = [torch.zeros_like(self.static, device="cpu") for _ in range(2)]
        self._hosts = [h.pin_memory() for h in hosts] if self.is_cuda else hosts
        self._flip = 0

    def fits(self, batch: Batch) -> bool:
        """A prefill-only chunk these graphs can run (prompt logprobs need every row's logits:
        those chunks run eagerly)."""
        items = batch.items
        return (
            (self.captured or not self.is_cuda)
            and 0 < len(items) <= self.max_items
            and batch.num_decode == 0
            and int(sum(it.count for it in items)) <= self.max_tokens
            and not any(it.wants_input_logprobs or it.draft is not None for it in items)
        )

    def forward_eager(self, bucket: int) -> torch.Tensor:
        """What `bucket`'s graph computes, run eagerly on the current stream (the CPU check of
        the padded layout): logits [max_items, vocab] of the staged logit rows."""
        return self._body(bucket)

    def _body(self, bucket: int) -> torch.Tensor:
        table = self.table
        positions, slots = self.positions[:bucket], self.slots[:bucket]
        table.req_to_token[self.token_rows[:bucket], positions] = slots.to(torch.int32)
        meta = AttentionMetadata(
            slot_mapping=slots,
            block_table=table.req_to_token.index_select(0, self.item_rows),
            seq_lens=self.seq_lens.to(torch.int32),
            cu_q_lens=self.cu.to(torch.int32),
            page_size=1,
            is_decode=False,
            max_q_len=bucket,
            num_decode=0,
        )
        return self.model.forward_paged(
            self.ids[:bucket],
            positions,
            meta,
            self.kv_cache,
            logit_rows=self.logit_rows,
            max_position=self.width - 1,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures every bucket on `stream` (largest first, one shared pool)."""
        self.release()
        self._pin_rotary()
        self._stage_host(self._hosts[0].numpy(), [], 0)
        self.static.copy_(self._hosts[0])
        stream = self.stream
        if stream is None and self.is_cuda:
            stream = torch.cuda.Stream(self.device)
        self._capture_buckets(stream)

    def _stage_host(self, host: np.ndarray, items_arrays: list[np.ndarray], tokens: int) -> None:
        """Fills the host block: the given arrays (ids, positions, token rows, slots, cu,
        seq_lens, item rows, logit rows, emit rows, emit next; each a prefix) then padding."""
        host[:] = 0
        views = np.split(host, np.cumsum(self._sizes)[:-1])
        for view, values in zip(views, items_arrays, strict=False):
            view[: len(values)] = values
        pad = self.table.pad_row
        views[2][tokens:] = pad  # padding tokens: the spare row, position 0, slot 0
        count = len(items_arrays[5]) if len(items_arrays) > 5 else 0
        views[4][count + 1 :] = tokens  # padding items: no tokens
        views[6][count:] = pad  # ... on the spare row, seq_len 0

    @torch.inference_mode()
    def stage_arrays(
        self,
        ids: np.ndarray,
        positions: np.ndarray,
        token_rows: np.ndarray,
        slots: np.ndarray,
        cu: np.ndarray,
        seq_lens: np.ndarray,
        item_rows: np.ndarray,
        logit_rows: np.ndarray,
        emit_rows: np.ndarray,
        emit_next: np.ndarray,
    ) -> int:
        """Copies one chunk's inputs into the static buffers on the current stream; returns
        the bucket to replay."""
        if self.is_cuda or self.emulate:
            self.ensure_current()
        tokens = len(ids)
        bucket = next(b for b in self.buckets if b >= tokens)
        self._flip ^= 1
        host_t = self._hosts[self._flip]
        arrays = [ids, positions, token_rows, slots, cu, seq_lens, item_rows, logit_rows]
        self._stage_host(host_t.numpy(), [*arrays, emit_rows, emit_next], tokens)
        # The whole pinned block: a sliced source would go through pageable memory and stall.
        self.static.copy_(host_t, non_blocking=self.is_cuda)
        return bucket

    def stage(self, batch: Batch) -> StagedPrefill:
        """Stages a prefill-only chunk (`fits(batch)`); on the current stream."""
        items = batch.items
        layout = pack_layout(items)
        emitting = [i for i, it in enumerate(items) if it.emits_token]
        emit = np.asarray(emitting, dtype=np.int64)
        bucket = self.stage_arrays(
            host_input_ids(items, layout, 0),
            layout.positions,
            np.repeat(batch.rows, layout.counts),
            batch.slots.numpy(),
            layout.cu,
            layout.ends,
            batch.rows,
            (layout.cu[1:] - 1)[emit],
            batch.rows[emit],
            layout.ends[emit],
        )
        n = len(emitting)
        return StagedPrefill(bucket, emitting, self.emit_rows[:n], self.emit_next[:n])

    def replay(self, bucket: int) -> None:
        """Replays `bucket`'s graph on the current stream (the partition's)."""
        self.graphs[bucket].replay()
        self.replays += 1

    def logits(self, staged: StagedPrefill) -> torch.Tensor:
        """The emitting items' logits of the last replay (valid until the next one)."""
        return self.outputs[staged.bucket][: len(staged.emitting)]
