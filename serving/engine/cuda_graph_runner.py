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
        self.host = torch.zeros((5, max_bs), dtype=torch.int64).pin_memory()
        self.host_np = self.host.numpy()
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

    @torch.inference_mode()
    def forward(self, items: list[ForwardItem], num_decode: int) -> StepResult:
        bs = len(items)
        if num_decode != bs or bs > self.max_bs or self.kv_cache.released:
            return super().forward(items, num_decode)
        bucket = next(b for b in self.buckets if b >= bs)
        host = self.host_np
        for i, item in enumerate(items):
            req = item.request
            host[0, i] = req.token_slice(item.start, item.start + 1)[0]
            host[1, i] = item.start
            host[2, i] = req.row
            host[3, i] = item.start + 1
        host[4, :bs] = torch.cat([item.slots for item in items]).numpy()
        host[:, bs:] = 0  # padding rows: seq_len 0, K/V into the reserved slot 0
        # Whole (contiguous, 40 bytes per row) block: one plain async copy from pinned memory.
        # Safe to refill next step: sampling below synchronizes before we return.
        self.static.copy_(self.host, non_blocking=True)
        self.seq_lens[:bucket].copy_(self._seq_lens64[:bucket])
        # The new tokens' slots into the request table, then this step's block table.
        self.table.req_to_token[self.rows[:bs], self.positions[:bs]] = self.slot_mapping[:bs].to(
            torch.int32
        )
        torch.index_select(
            self.table.req_to_token, 0, self.rows[:bucket], out=self.block_table[:bucket]
        )
        self.block_table[bs:bucket].zero_()
        self.graphs[bucket].replay()
        self.graph_steps += 1
        logits = self.outputs[bucket][:bs]
        tokens, logprobs = self.sample([item.request for item in items], logits)
        return StepResult(tokens, logprobs, {})
