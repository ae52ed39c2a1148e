"""Decode steps replayed from CUDA graphs (GPU only).

`BucketGraphs` holds what every graph family shares (capture loop, pool, staleness, release).
Decode-only batches of up to `max_bs` sequences replay graphs captured for a set of batch-size
buckets; a batch is padded up to its bucket with rows of seq_len 0 (the Triton decode kernel
writes zeros for them) on the table's spare row, whose K/V go to the reserved slot 0. A graph
covers the whole step but sampling: the slot-table update, the input-id and block-table gathers,
the forward. All graphs share one memory pool.
Why: a decode step of a small model is a few hundred small kernels; launching them one by one
from Python costs more than the GPU work itself.

A graph holds the addresses of the parameters, the KV buffers and its static inputs. Anything
that moves them (memory release/resume) must `release()` the graphs first and `capture()` again
after; the runner enforces that.

CPU emulation (EMULATE_ENV=1, for tests without a GPU): "capture" records the body and "replay"
runs it eagerly over the same static inputs into `outputs[bucket]`, so staging, padding, bucket
choice, release and recapture run exactly as on a GPU; only the CUDA graph itself is absent.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from rollout_accel.serving.engine.kv_pool import RequestTable
from rollout_accel.serving.models.decoder import CausalLM
from rollout_accel.serving.models.paged_kv import AttentionMetadata, PagedKVCache

EMULATE_ENV = "ROLLOUT_ACCEL_EMULATE_GRAPHS"


def emulated(device: torch.device) -> bool:
    """Graphs are emulated: a CPU device and EMULATE_ENV=1."""
    return device.type != "cuda" and os.environ.get(EMULATE_ENV) == "1"


class _EmulatedGraph:
    """A CPU stand-in for a captured graph: `replay` runs the body into its bucket's output."""

    def __init__(self, owner: BucketGraphs, bucket: int) -> None:
        self.owner = owner
        self.bucket = bucket

    def replay(self) -> None:
        self.owner.outputs[self.bucket] = self.owner._body(self.bucket)


def batch_buckets(max_bs: int) -> list[int]:
    small = [1, 2, 4, 8, 12, 16, 24, 32]
    return sorted({b for b in small if b <= max_bs} | set(range(48, max_bs + 1, 16)) | {max_bs})


class BucketGraphs:
    """One captured graph of a forward body per bucket, all in one memory pool: the capture
    loop, the staleness check and release shared by the decode, verify and SM-sharing prefill
    graphs. A subclass sets `model`, `device`, `width` and `buckets`, stages its padding, and
    implements `_body(bucket)` (the forward over its static inputs) and `capture()`."""

    # thread_local: only this thread's capture-unsafe calls invalidate a capture; a recapture
    # (after resume) may run while other threads use CUDA (an NCCL watchdog of a weight-update
    # group, the HTTP server's engine calls).
    capture_error_mode = "thread_local"
    model: CausalLM
    device: torch.device
    width: int
    buckets: list[int]

    def _init_graphs(self) -> None:
        self.emulate = emulated(self.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph | _EmulatedGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        self.replays = 0
        self.captures = 0
        self._rotary_generation = -1

    def _body(self, bucket: int) -> torch.Tensor:
        raise NotImplementedError

    def capture(self) -> None:
        raise NotImplementedError

    @property
    def captured(self) -> bool:
        return bool(self.graphs)

    @property
    def stale(self) -> bool:
        """The rotary tables were reallocated since capture: the graphs read freed memory."""
        return self.captured and self.model.model.rotary.generation != self._rotary_generation

    def ensure_current(self) -> None:
        """Captures when there are no graphs yet or they went stale (correctness first: a
        stale replay would compute with garbage cos/sin)."""
        if not self.captured or self.stale:
            self.capture()

    def _pin_rotary(self) -> None:
        """Rotary tables must exist for every position before capture (no growth inside a
        graph); their generation tells `stale` if they ever move."""
        rotary = self.model.model.rotary
        rotary.tables(self.width, self.device)
        self._rotary_generation = rotary.generation

    def _capture_buckets(self, stream: torch.cuda.Stream | None) -> None:
        """Warms up and captures every bucket on `stream`, largest first (the pool is sized by
        the first), then joins the current stream."""
        if self.emulate:
            self.graphs = {bucket: _EmulatedGraph(self, bucket) for bucket in self.buckets}
            self.captures += 1
            return
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for bucket in reversed(self.buckets):
                self._body(bucket)  # warm-up: Triton compiles and autotunes outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(
                    graph, pool=self.pool, stream=stream, capture_error_mode=self.capture_error_mode
                ):
                    self.outputs[bucket] = self._body(bucket)
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[bucket] = graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        self.captures += 1

    def release(self) -> None:
        """Drops the graphs and their memory pool (they would point at moved buffers)."""
        if not self.graphs and self.pool is None:
            return
        self.graphs.clear()
        self.outputs.clear()
        self.pool = None
        if not self.emulate:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()


class DecodeGraphs(BucketGraphs):
    """Captured decode graphs over static input buffers; `run` stages a batch and replays."""

    def __init__(
        self, model: CausalLM, kv_cache: PagedKVCache, table: RequestTable, max_bs: int
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.table = table
        self.max_bs = max_bs
        self.buckets = batch_buckets(max_bs)
        self.device = table.device
        self.width = table.max_context
        self._init_graphs()
        self._allocate_inputs()

    def _allocate_inputs(self) -> None:
        dev, bs = self.device, self.max_bs
        # One [4, max_bs] block (positions, rows, slots, seq_lens) is all a step sends: one
        # host-to-device copy from one of two pinned buffers (alternated: with overlap the CPU
        # stages step N+1 while step N's copy may still be queued). Everything else a step needs
        # (input ids, block table, the new slots in the table) is gathered inside the graph.
        self.static = torch.zeros((4, bs), dtype=torch.int64, device=dev)
        self.positions, self.rows, self.slot_mapping, self._seq_lens64 = self.static
        hosts = [torch.zeros((4, bs), dtype=torch.int64) for _ in range(2)]
        self._hosts = hosts if self.emulate else [h.pin_memory() for h in hosts]
        self._flip = 0
        self.cu_q_lens = torch.arange(bs + 1, dtype=torch.int32, device=dev)

    def _body(self, bs: int) -> torch.Tensor:
        rows, positions, slots = self.rows[:bs], self.positions[:bs], self.slot_mapping[:bs]
        table = self.table
        table.req_to_token[rows, positions] = slots.to(torch.int32)
        meta = AttentionMetadata(
            slot_mapping=slots,
            block_table=table.req_to_token.index_select(0, rows),
            seq_lens=self._seq_lens64[:bs].to(torch.int32),
            cu_q_lens=self.cu_q_lens[: bs + 1],
            page_size=1,
            is_decode=True,
            max_q_len=1,
            num_decode=bs,
        )
        return self.model.forward_paged(
            table.token_ids[rows, positions],
            positions,
            meta,
            self.kv_cache,
            logit_rows=None,
            max_position=self.width - 1,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures every bucket (padding rows: seq_len 0, K/V into the reserved slot 0)."""
        self.release()
        self._pin_rotary()
        self._stage_padding(0, self.max_bs)
        self._capture_buckets(self._capture_stream())

    def _capture_stream(self) -> torch.cuda.Stream | None:
        """The stream the graphs are captured on (a graph keeps to the SMs of the stream it was
        captured on: a side stream here, a partition's stream for SM sharing)."""
        return None if self.emulate else torch.cuda.Stream(self.device)

    def fits(self, batch_size: int) -> bool:
        return self.captured and 0 < batch_size <= self.max_bs

    def _stage_padding(self, start: int, end: int) -> None:
        """Padding rows: the table's spare row, slot 0 (reserved), seq_len 0 (no attention)."""
        self.static[:, start:end] = 0
        self.static[1, start:end] = self.table.pad_row

    @torch.inference_mode()
    def run(self, positions: np.ndarray, rows: np.ndarray, slots: torch.Tensor) -> torch.Tensor:
        """Stages one decode batch and replays its bucket's graph; returns the logits
        [bs, vocab] (a view of the graph's output, valid until the next replay)."""
        bucket = self.stage(positions, rows, slots)
        self.replay(bucket)
        return self.outputs[bucket][: len(positions)]

    @torch.inference_mode()
    def stage(self, positions: np.ndarray, rows: np.ndarray, slots: torch.Tensor) -> int:
        """Copies one decode batch into the static inputs (on the current stream); returns the
        bucket to replay. Staging and replay may go to different streams (SM sharing)."""
        self.ensure_current()
        bs = len(positions)
        bucket = next(b for b in self.buckets if b >= bs)
        self._flip ^= 1
        host_t = self._hosts[self._flip]
        host = host_t.numpy()
        host[0, :bs] = positions
        host[1, :bs] = rows
        host[2, :bs] = slots.numpy()
        host[3, :bs] = positions + 1
        host[:, bs:bucket] = 0
        host[1, bs:bucket] = self.table.pad_row
        # The whole pinned block (16 bytes a row): a sliced, non-contiguous source would be
        # staged through pageable memory, and that copy waits for the stream (a full stall).
        self.static.copy_(host_t, non_blocking=not self.emulate)
        return bucket

    def replay(self, bucket: int) -> None:
        """Replays `bucket`'s graph on the current stream (inputs staged by `stage`)."""
        self.graphs[bucket].replay()
        self.replays += 1
