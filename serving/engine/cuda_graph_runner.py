"""Decode steps replayed from CUDA graphs (GPU only).

Decode-only batches of up to `max_bs` sequences run from graphs captured at startup for a set of
batch-size buckets; a batch is padded up to its bucket with rows of seq_len 0 (the Triton decode
kernel writes zeros for them) whose K/V go to the reserved slot 0. All graphs share one memory
pool. Prefill and mixed batches run eagerly (their shapes vary too much to be worth capturing).
Why: a decode step of a small model is a few hundred small kernels; launching them one by one
from Python costs more than the GPU work itself.
"""

from __future__ import annotations

import torch

from rollout_accel.serving.engine.kv_pool import RequestTable
from rollout_accel.serving.engine.model_runner import ForwardItem, ModelRunner, StepResult
from rollout_accel.serving.models.decoder import CausalLM
from rollout_accel.serving.models.paged_kv import AttentionMetadata, PagedKVCache


def batch_buckets(max_bs: int) -> list[int]:
    small = [1, 2, 4, 8, 12, 16, 24, 32]
    return sorted({b for b in small if b <= max_bs} | set(range(48, max_bs + 1, 16)) | {max_bs})


class CudaGraphModelRunner(ModelRunner):
    """A ModelRunner whose decode-only steps replay captured graphs."""

    def __init__(
        self,
        model: CausalLM,
        kv_cache: PagedKVCache,
        table: RequestTable,
        eos_ids: tuple[int, ...],
        max_bs: int = 256,
    ) -> None:
        super().__init__(model, kv_cache, table, eos_ids)
        self.max_bs = max_bs
        self.buckets = batch_buckets(max_bs)
        width = table.req_to_token.shape[1]
        dev = self.device
        self.width = width
        # One [5, max_bs] staging block (ids, positions, rows, seq_lens, slots): a single host-to-
        # device copy per step from a persistent pinned buffer.
        self.static = torch.zeros((5, max_bs), dtype=torch.int64, device=dev)
        self.input_ids, self.positions, self.rows, seq_lens64, self.slot_mapping = self.static
        self._seq_lens64 = seq_lens64
        # Two pinned staging blocks and two pinned result blocks, alternated: with overlap the CPU
        # stages step N+1 while step N's copies may still be queued on the GPU.
        self._hosts = [torch.zeros((5, max_bs), dtype=torch.int64).pin_memory() for _ in range(2)]
        self._results = [
            (torch.zeros(max_bs, dtype=torch.int64).pin_memory(), torch.zeros(max_bs).pin_memory())
            for _ in range(2)
        ]
        self._flip = 0
        self.seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self.block_table = torch.zeros((max_bs, width), dtype=torch.int32, device=dev)
        self.cu_q_lens = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        self.graph_steps = 0
        self._capture()

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            block_table=self.block_table[:bs],
            seq_lens=self.seq_lens[:bs],
            cu_q_lens=self.cu_q_lens[: bs + 1],
            page_size=1,
            is_decode=True,
            max_q_len=1,
            num_decode=bs,
        )

    def _body(self, bs: int) -> torch.Tensor:
        return self.model.forward_paged(
            self.input_ids[:bs],
            self.positions[:bs],
            self._meta(bs),
            self.kv_cache,
            logit_rows=None,
            max_position=self.width - 1,
        )

    @torch.inference_mode()
    def _capture(self) -> None:
        # Rotary tables must exist for every position before capture (no growth inside a graph).
        self.model.model.rotary.tables(self.width, self.device)
        # Padding rows: seq_len 0, K/V written to the reserved slot 0.
        self.seq_lens.zero_()
        self.static.zero_()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for bs in reversed(self.buckets):
                self._body(bs)  # warm-up: Triton compiles and autotunes outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    self.outputs[bs] = self._body(bs)
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[bs] = graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)

    def can_overlap(self, items: list[ForwardItem]) -> bool:
        """Whether `items` may run as an overlapped decode step: a graph fits, and sampling needs
        nothing that the not-yet-known previous token would change (penalties, min_new_tokens)."""
        if not items or len(items) > self.max_bs or self.kv_cache.released:
            return False
        for item in items:
            params = item.request.params
            if params.has_penalties or len(item.request.output_ids) + 2 < params.min_new_tokens:
                return False
            if item.request.grammar is not None:  # its mask needs the previous token first
                return False
        return True

    def _stage(self, items: list[ForwardItem], prev: PendingDecode | None) -> int:
        """Fills the static inputs for a decode batch; returns its bucket. With `prev`, each
        request's input token is the one `prev` sampled for it (still on the device)."""
        bs = len(items)
        bucket = next(b for b in self.buckets if b >= bs)
        self._flip ^= 1
        host_t = self._hosts[self._flip]
        host = host_t.numpy()
        for i, item in enumerate(items):
            req = item.request
            if prev is None:
                host[0, i] = req.token_slice(item.start, item.start + 1)[0]
            host[1, i] = item.start
            host[2, i] = req.row
            host[3, i] = item.start + 1
        host[4, :bs] = torch.cat([item.slots for item in items]).numpy()
        host[:, bs:] = 0  # padding rows: seq_len 0, K/V into the reserved slot 0
        self.static.copy_(host_t, non_blocking=True)
        if prev is not None:
            if prev.index_map is None:
                self.input_ids[:bs].copy_(prev.tokens[:bs])
            else:
                index = torch.tensor(prev.index_map, dtype=torch.int64).to(
                    self.device, non_blocking=True
                )
                self.input_ids[:bs].copy_(prev.tokens.index_select(0, index))
        self.seq_lens[:bucket].copy_(self._seq_lens64[:bucket])
        # The new tokens' slots into the request table, then this step's block table.
        self.table.req_to_token[self.rows[:bs], self.positions[:bs]] = self.slot_mapping[:bs].to(
            torch.int32
        )
        torch.index_select(
            self.table.req_to_token, 0, self.rows[:bucket], out=self.block_table[:bucket]
        )
        self.block_table[bs:bucket].zero_()
        return bucket

    @torch.inference_mode()
    def launch(self, items: list[ForwardItem], prev: PendingDecode | None = None) -> PendingDecode:
        """Queues one decode step (graph replay + sampling + copy of the results to pinned host
        memory) and returns without waiting for the GPU."""
        bucket = self._stage(items, prev)
        self.graphs[bucket].replay()
        self.graph_steps += 1
        logits = self.outputs[bucket][: len(items)]
        tokens, logprobs = self.sample_device(
            [item.request for item in items], logits, step_offset=1 if prev is not None else 0
        )
        host_tokens, host_logprobs = self._results[self._flip]
        host_tokens[: len(items)].copy_(tokens, non_blocking=True)
        host_logprobs[: len(items)].copy_(logprobs, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return PendingDecode(items, tokens, host_tokens, host_logprobs, event)

    @torch.inference_mode()
    def forward(self, items: list[ForwardItem], num_decode: int) -> StepResult:
        bs = len(items)
        if num_decode != bs or bs > self.max_bs or self.kv_cache.released:
            return super().forward(items, num_decode)
        bucket = self._stage(items, None)
        self.graphs[bucket].replay()
        self.graph_steps += 1
        logits = self.outputs[bucket][:bs]
        tokens, logprobs = self.sample([item.request for item in items], logits)
        return StepResult(tokens, logprobs, {})


class PendingDecode:
    """A decode step queued on the GPU; `wait()` gives its tokens and logprobs.

    `index_map` (set by the scheduler for the step that follows) says which of this step's rows
    each request of the next step continues; None means the same rows in the same order.
    """

    def __init__(
        self,
        items: list[ForwardItem],
        tokens: torch.Tensor,
        host_tokens: torch.Tensor,
        host_logprobs: torch.Tensor,
        event: torch.cuda.Event,
    ) -> None:
        self.items = items
        self.tokens = tokens
        self._host_tokens = host_tokens
        self._host_logprobs = host_logprobs
        self._event = event
        self.index_map: list[int] | None = None

    def wait(self) -> tuple[list[int], list[float]]:
        self._event.synchronize()
        count = len(self.items)
        return self._host_tokens[:count].tolist(), self._host_logprobs[:count].tolist()
