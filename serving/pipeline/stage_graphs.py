"""CUDA graphs of one pipeline stage's part of a decode micro-batch (GPU only).

Why: eager stages are bound by launching kernels from Python (on 2 H200s, a Qwen3-8B stage of 18
layers was busy 22.5 ms a step for ~1.7 ms of weight reads), so micro-batches and rebalancing
moved host time around instead of GPU time.

What a graph covers, per batch-size bucket (as `serving/engine/cuda_graphs.DecodeGraphs`):
  * stage 0: input-id gather + embedding + its layers;
  * a middle stage: its layers, from the received hidden state and residual;
  * the last stage: its layers (one graph), then the final norm + LM head (a second graph, so the
    predictor still sees the head apart from the layers); sampling stays eager, outside.
Prefill and mixed micro-batches (and decode ones that want prompt logprobs) stay eager.

Padding: a micro-batch of n rows replays the smallest bucket >= n; rows n..bucket are the
table's spare row at position 0, writing K/V into the reserved slot 0 with seq_len 0 (the decode
kernel writes zeros for them). One memory pool per stage; warm-up runs before each capture on a
side stream; the rotary tables are grown to the full context before capture.

Invariant (correctness first): a graph never replays with stale addresses. Everything a graph
reads by address is fingerprinted at capture (the stage's parameters and fused weights, its
layers' K/V buffers, the table, the rotary generation) and checked at every step boundary; the
known triggers (a layer move, memory release, a forced recapture) drop the graphs explicitly as
well. Dropped graphs are captured again lazily, at a step boundary, for the buckets a step needs,
and only while the partition is settled (no layer move queued or in flight): during a run of moves
the stage runs eagerly instead of capturing at every boundary.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rollout_accel.kernels.fused_ops import add_rms_norm
from rollout_accel.serving.engine.cuda_graphs import batch_buckets
from rollout_accel.serving.models.paged_kv import AttentionMetadata

if TYPE_CHECKING:
    from rollout_accel.serving.pipeline.plan import MicroBatch
    from rollout_accel.serving.pipeline.stage import StageExecutor

log = logging.getLogger(__name__)

# Tests only: on the CPU, "capture" records the graph bodies and "replay" runs them eagerly into
# the same static outputs, so the host-side protocol (static inputs, receives into them, output
# views, head, sampling, recapture) runs end to end without CUDA. Inherited by spawned stages.
EMULATE_ENV = "ROLLOUT_ACCEL_EMULATE_STAGE_GRAPHS"


def emulated() -> bool:
    return os.environ.get(EMULATE_ENV) == "1"


class _EmulatedGraph:
    """A CPU stand-in for a captured graph: replay recomputes the body into fixed outputs."""

    def __init__(self, body: Any, outputs: tuple[torch.Tensor, ...]) -> None:
        self.body, self.outputs = body, outputs

    def replay(self) -> None:
        for out, new in zip(self.outputs, self.body(), strict=True):
            out.copy_(new)


def pick_bucket(buckets: list[int], rows: int) -> int | None:
    """The smallest bucket holding `rows` rows (None: too many, or none)."""
    if rows < 1:
        return None
    return next((b for b in buckets if b >= rows), None)


def graphable(mb: MicroBatch) -> bool:
    """Whether a micro-batch can replay a decode graph: every item decodes one token and emits
    it (the head graph computes logits for every row, the sampler takes them in order), and no
    item wants prompt logprobs."""
    n = len(mb.rows)
    return (
        n > 0
        and mb.num_decode == n
        and mb.num_tokens == n
        and mb.lp_plan is None
        and len(mb.emit_rows) == n
    )


def padded_inputs(
    positions: np.ndarray,
    rows: np.ndarray,
    slots: np.ndarray,
    seq_lens: np.ndarray,
    bucket: int,
    pad_row: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """The [4, bucket] int64 block a replay reads (positions, rows, slots, seq_lens); padding
    rows: position 0, the table's spare row, reserved slot 0, seq_len 0 (attends to nothing)."""
    n = len(positions)
    if n > bucket:
        raise ValueError(f"{n} rows do not fit bucket {bucket}")
    block = np.zeros((4, bucket), np.int64) if out is None else out[:, :bucket]
    block[0, :n] = positions
    block[1, :n] = rows
    block[2, :n] = slots
    block[3, :n] = seq_lens
    block[:, n:] = 0
    block[1, n:] = pad_row
    return block


class StageGraphs:
    """Decode graphs of one stage (see module docstring). `prepare(plan)` at a step boundary
    checks the graphs are current and picks each micro-batch's bucket (None: eager); `run`
    stages one micro-batch and replays."""

    def __init__(self, ex: StageExecutor, max_bs: int) -> None:
        self.ex = ex
        self.device = ex.device
        self.is_cuda = self.device.type == "cuda"
        self.emulate = not self.is_cuda and emulated()
        self.max_bs = max_bs
        self.buckets = batch_buckets(max_bs)
        self.width = ex.table.max_context
        self.enabled = True  # runtime switch (benchmarks compare eager and graphs on one engine)
        self.layers: dict[int, Any] = {}  # bucket -> graph of the layers (embedding on stage 0)
        self.heads: dict[int, Any] = {}  # bucket -> graph of norm + LM head (last stage)
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # (hidden, residual)
        self.logits: dict[int, torch.Tensor] = {}
        self.pool: Any = None
        self.captures = 0  # graphs captured (one per bucket and segment)
        self.replays = 0  # micro-batches replayed
        self.eager_decode = 0  # decode micro-batches that ran eagerly (graphs unavailable)
        self.invalidations: list[str] = []  # why graphs were dropped, in order
        self.failed: str | None = None  # a capture's error (graphs then off on this stage)
        self._fingerprint: tuple[int, ...] | None = None
        self._watch_key: tuple[int, int] | None = None
        self._watch_params: list[torch.nn.Parameter] = []
        self._watch_layers: list[torch.nn.Module] = []
        self._rotary_generation = -1
        dev, bs = self.device, max_bs
        self.static = torch.zeros((4, bs), dtype=torch.int64, device=dev)
        self.cu_q_lens = torch.arange(bs + 1, dtype=torch.int32, device=dev)
        hidden = ex.hidden_size
        # Received hidden state and residual land here directly (middle and last stages).
        self.hidden_in = torch.zeros((bs, hidden), dtype=ex.dtype, device=dev)
        self.residual_in = torch.zeros_like(self.hidden_in)
        # Pinned staging blocks, a ring with an event each: a block is rewritten only after its
        # previous host-to-device copy ran (several micro-batches per step, no host sync).
        pin = self.is_cuda
        self._hosts = [torch.zeros((4, bs), dtype=torch.int64, pin_memory=pin) for _ in range(4)]
        self._copied: list[Any] = [None] * len(self._hosts)
        self._turn = 0

    # -- state ----------------------------------------------------------------------------------
    @property
    def captured(self) -> bool:
        return bool(self.layers)

    def fingerprint(self) -> tuple[int, ...]:
        """The addresses the stage's graphs read: parameters (of its layers, embedding / norm /
        head where it owns them), fused weights, its layers' K/V buffers and the table."""
        ex = self.ex
        model = ex.model
        start, end = ex.layer_range
        if self._watch_key != (start, end):
            # Parameter objects stay (moves, release and resume re-point their .data): list them
            # once per layer range, read their addresses every step (~200 reads for 18 layers).
            layers = list(model.model.layers[start:end])
            self._watch_params = [p for layer in layers for p in layer.parameters()]
            self._watch_layers = layers
            self._watch_key = (start, end)
        ptrs: list[int] = [start, end]
        ptrs += [p.data_ptr() for p in self._watch_params]
        for layer in self._watch_layers:
            attn, mlp = layer.self_attn, layer.mlp
            for fused in (attn.qkv_weight, attn.qkv_bias, mlp.gate_up_weight):
                ptrs.append(0 if fused is None else fused.data_ptr())
        ptrs += [ex.kv.k[i].data_ptr() for i in range(start, end)]
        ptrs += [ex.kv.v[i].data_ptr() for i in range(start, end)]
        if ex.is_first:
            ptrs.append(model.model.embed_tokens.weight.data_ptr())
        if ex.is_last:
            ptrs += [model.model.norm.weight.data_ptr(), model.lm_head.weight.data_ptr()]
        ptrs += [ex.table.req_to_token.data_ptr(), ex.table.token_ids.data_ptr()]
        return tuple(ptrs)

    def stale_reason(self) -> str | None:
        """Why the captured graphs must not replay (None: current, or nothing captured)."""
        if not self.captured:
            return None
        if self.ex.model.model.rotary.generation != self._rotary_generation:
            return "rotary tables reallocated"
        if self.fingerprint() != self._fingerprint:
            return "addresses changed"
        return None

    def invalidate(self, reason: str) -> None:
        """Drops every graph and the pool (captured again lazily at a later step boundary)."""
        if not self.captured and self.pool is None and not self.heads:
            return
        self.invalidations.append(reason)
        if self.is_cuda:
            # A replay of the last step may still run on the device: let it finish before its
            # graph and pool memory go back to the allocator.
            torch.cuda.synchronize(self.device)
        self.layers.clear()
        self.heads.clear()
        self.outputs.clear()
        self.logits.clear()
        self.pool = None
        self._fingerprint = None
        if self.is_cuda:
            torch.cuda.empty_cache()
        log.info("stage %d: decode graphs dropped (%s)", self.ex.stage, reason)

    def stats(self) -> dict[str, Any]:
        return {
            "captured_buckets": sorted(self.layers),
            "captures": self.captures,
            "replays": self.replays,
            "eager_decode": self.eager_decode,
            "invalidations": len(self.invalidations),
            "enabled": self.enabled,
            "failed": self.failed,
        }

    # -- a step ---------------------------------------------------------------------------------
    def prepare(self, micro: list[MicroBatch], may_capture: bool) -> list[int | None]:
        """At a step boundary: drops stale graphs, captures missing buckets when allowed, and
        returns each micro-batch's bucket (None: run it eagerly). Every stage gets the same plan,
        so every stage takes the same decisions."""
        reason = self.stale_reason()
        if reason is not None:
            self.invalidate(reason)
        usable = self.enabled and self._can_capture() and not (self.ex.released & _BLOCKING)
        picks: list[int | None] = []
        for mb in micro:
            bucket = pick_bucket(self.buckets, len(mb.rows)) if graphable(mb) else None
            if bucket is not None and usable and bucket not in self.layers and may_capture:
                usable = self._try_capture(bucket)
            if bucket is not None and not (usable and bucket in self.layers):
                self.eager_decode += 1
                bucket = None
            picks.append(bucket)
        return picks

    def _stage(self, mb: MicroBatch, positions: np.ndarray, slots: np.ndarray, bucket: int) -> None:
        """Copies one micro-batch's inputs into the static block (stream-ordered)."""
        turn = self._turn
        self._turn = (turn + 1) % len(self._hosts)
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()  # normally long done: a ring of 4
        host_t = self._hosts[turn]
        padded_inputs(
            positions, mb.rows, slots, mb.ends, bucket, self.ex.table.pad_row, host_t.numpy()
        )
        # The whole pinned block: a non-contiguous source would go through pageable memory.
        self.static.copy_(host_t, non_blocking=True)
        if self.is_cuda:
            event = torch.cuda.Event()
            event.record()
            self._copied[turn] = event

    def receive(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where a middle or last stage receives a graphed micro-batch's inputs."""
        return self.hidden_in[:rows], self.residual_in[:rows]

    def run_layers(
        self, mb: MicroBatch, positions: np.ndarray, slots: np.ndarray, bucket: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stages the micro-batch and replays its layers; returns (hidden, residual) of its rows
        (views of the graph's outputs: valid until the bucket's next replay)."""
        self._stage(mb, positions, slots, bucket)
        self.layers[bucket].replay()
        self.replays += 1
        hidden, residual = self.outputs[bucket]
        n = len(mb.rows)
        return hidden[:n], residual[:n]

    def run_head(self, rows: int, bucket: int) -> torch.Tensor:
        """Replays the norm + LM head after `run_layers` (last stage); logits [rows, vocab]."""
        self.heads[bucket].replay()
        return self.logits[bucket][:rows]

    # -- capture --------------------------------------------------------------------------------
    def _layers_body(self, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        ex = self.ex
        model = ex.model
        positions, rows, slots = self.static[0, :bs], self.static[1, :bs], self.static[2, :bs]
        table = ex.table
        meta = AttentionMetadata(
            slot_mapping=slots,
            block_table=table.req_to_token.index_select(0, rows),
            seq_lens=self.static[3, :bs].to(torch.int32),
            cu_q_lens=self.cu_q_lens[: bs + 1],
            page_size=1,
            is_decode=True,
            max_q_len=1,
            num_decode=bs,
        )
        cos, sin = model.model.rotary(positions, max_position=self.width - 1)
        residual: torch.Tensor | None
        if ex.is_first:
            hidden = model.embed(table.token_ids[rows, positions])
            residual = None
        else:
            hidden, residual = self.hidden_in[:bs], self.residual_in[:bs]
        start, end = ex.layer_range
        for layer in model.model.layers[start:end]:
            hidden, residual = layer.forward_paged(hidden, residual, cos, sin, meta, ex.kv)
        assert residual is not None  # every stage owns at least one layer
        return hidden, residual

    def _head_body(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        model = self.ex.model
        norm = model.model.norm
        normed, _ = add_rms_norm(hidden, residual, norm.weight, norm.eps)
        return model.lm_head(normed)

    def _can_capture(self) -> bool:
        return self.is_cuda or self.emulate

    def _capture_emulated(self, bucket: int) -> None:
        # No warm-up run: the CPU reference attention gives NaN for seq_len-0 padding rows.
        hidden = torch.zeros((bucket, self.ex.hidden_size), dtype=self.ex.dtype)
        out = (hidden, torch.zeros_like(hidden))
        self.layers[bucket] = _EmulatedGraph(lambda: self._layers_body(bucket), out)
        self.outputs[bucket] = out
        self.captures += 1
        if self.ex.is_last:
            vocab = self.ex.model.config.vocab_size
            logits = torch.zeros((bucket, vocab), dtype=self.ex.dtype)
            self.heads[bucket] = _EmulatedGraph(lambda: (self._head_body(*out),), (logits,))
            self.logits[bucket] = logits
            self.captures += 1
        self._rotary_generation = self.ex.model.model.rotary.generation
        self._fingerprint = self.fingerprint()

    @torch.inference_mode()
    def capture(self, bucket: int) -> None:
        """Captures one bucket (padding rows only during warm-up and capture: K/V go to slot 0).
        Called at a step boundary, before the step's receives touch the static inputs."""
        if self.emulate:
            self._capture_emulated(bucket)
            return
        if not self.is_cuda:
            raise RuntimeError("decode graphs need a CUDA device")
        ex = self.ex
        rotary = ex.model.model.rotary
        # Grown to the full context now: a graph must never see the tables reallocated.
        rotary.tables(self.width, self.device)
        if self.captured and rotary.generation != self._rotary_generation:
            self.invalidate("rotary tables reallocated")
        self._rotary_generation = rotary.generation
        self.static[:, :bucket] = 0
        self.static[1, :bucket] = ex.table.pad_row
        current = torch.cuda.current_stream(self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(current)
        # thread_local: the process group's watchdog thread may query events during capture.
        mode = "thread_local"
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            hidden, residual = self._layers_body(bucket)  # warm-up (Triton compiles, autotunes)
            if ex.is_last:
                self._head_body(hidden, residual)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=stream, capture_error_mode=mode):
                out = self._layers_body(bucket)
            if self.pool is None:
                self.pool = graph.pool()
            self.layers[bucket] = graph
            self.outputs[bucket] = out
            self.captures += 1
            if ex.is_last:
                head = torch.cuda.CUDAGraph()
                with torch.cuda.graph(head, pool=self.pool, stream=stream, capture_error_mode=mode):
                    self.logits[bucket] = self._head_body(*out)
                self.heads[bucket] = head
                self.captures += 1
        current.wait_stream(stream)
        torch.cuda.synchronize(self.device)
        self._fingerprint = self.fingerprint()

    def capture_all(self) -> None:
        """Every bucket now (engine start, benchmark warm-up), largest first."""
        if not (self.enabled and self._can_capture()) or self.ex.released & _BLOCKING:
            return
        reason = self.stale_reason()
        if reason is not None:
            self.invalidate(reason)
        for bucket in reversed(self.buckets):
            if bucket not in self.layers and not self._try_capture(bucket):
                return

    def _try_capture(self, bucket: int) -> bool:
        """Captures `bucket`; a failed capture turns this stage's graphs off (eager from then
        on, reported in `stats`) rather than failing the pipeline. Mixing eager and graphed
        stages is fine: they exchange the same tensors."""
        try:
            self.capture(bucket)
            return True
        except Exception as exc:
            log.exception("stage %d: decode graph capture failed; running eagerly", self.ex.stage)
            self.failed = repr(exc)
            self.invalidate("capture failed")
            self.enabled = False
            return False


# Released memory a graph would read (or the graphs' own memory): no capture, no replay.
_BLOCKING = frozenset({"weights", "kv_cache", "cuda_graph"})
