"""One pipeline stage's device state and work: its layers' parameters and KV buffers, a mirror of
the request table, and the forward of its layer range for each micro-batch of a step.

Stage 0 embeds, the last stage runs the final norm, the LM head and the sampler; hidden states
and the residual stream travel stage to stage on the data group. Layers outside [start, end)
hold empty parameters and KV (their memory is given back); `begin_move` / `end_move` move one
layer's weights and the K/V of every used slot to a neighbour while steps keep running, and
ownership changes at the next step boundary. KV slot ids are global (stage 0 allocates them): every stage holds its
layers' K/V for every slot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from rollout_accel.kernels.fused_ops import add_rms_norm, rms_norm
from rollout_accel.serving.engine.batch import upload_packed
from rollout_accel.serving.engine.kv_pool import RequestTable
from rollout_accel.serving.engine.sampler import BatchSampler
from rollout_accel.serving.models.decoder import CausalLM
from rollout_accel.serving.models.loader import load_named_tensors
from rollout_accel.serving.models.paged_kv import AttentionMetadata, PagedKVCache
from rollout_accel.serving.pipeline.partition import Bounds, owner_of
from rollout_accel.serving.pipeline.plan import MicroBatch, StepPlan
from rollout_accel.serving.pipeline.stage_graphs import StageGraphs, emulated


@dataclass(slots=True)
class _RowView:
    """What the sampler reads of a request: its parameters and (for penalties) its outputs.
    Grammars and extra logprob options never reach a stage: `Engine.make_requests` refuses them
    when pp_size > 1."""

    params: Any
    output_ids: list[int]
    grammar: Any = None
    extra_logprobs: Any = None


def names_owned(name: str, stage: int, bounds: Bounds, tied: bool) -> bool:
    """Whether `stage` holds parameter `name` under `bounds` (tied head: first and last stage)."""
    last = len(bounds) - 2
    if name.startswith("model.layers."):
        return owner_of(bounds, int(name.split(".")[2])) == stage
    if name == "model.embed_tokens.weight":
        return stage == 0 or (tied and stage == last)
    if name == "lm_head.weight":
        return stage == last or (tied and stage == 0)
    return stage == last  # model.norm.weight


class StageExecutor:
    """Runs layer range [bounds[stage], bounds[stage + 1]) of `model` for each micro-batch."""

    def __init__(
        self,
        stage: int,
        bounds: Bounds,
        model: CausalLM,
        kv_cache: PagedKVCache,
        table: RequestTable,
        eos_ids: tuple[int, ...],
        data_group: dist.ProcessGroup,
        mirror_table: bool,
        shapes: dict[str, tuple[int, ...]] | None = None,
        graph_max_bs: int = 0,
    ) -> None:
        self.stage = stage
        self.bounds = bounds
        self.model = model
        self.kv = kv_cache
        self.table = table
        self.mirror_table = mirror_table
        self.group = data_group
        self.device = table.device
        self.is_cuda = self.device.type == "cuda"
        cfg = model.config
        self.tied = cfg.tie_word_embeddings
        self.hidden_size = cfg.hidden_size
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.sampler = BatchSampler(table, cfg.vocab_size, eos_ids)
        self.samplers: dict[int, Any] = {}
        self._outputs: dict[int, list[int]] = {}
        self._migration: tuple[int, list[Any], list[torch.Tensor], torch.Tensor] | None = None
        # Full shapes of every parameter (a worker's skeleton holds only its own).
        self.shapes = shapes or {name: tuple(p.shape) for name, p in model.named_parameters()}
        owned_kv = next(k for k in kv_cache.k if k.numel())
        self.kv_shape = tuple(owned_kv.shape)
        self.kv_dtype = owned_kv.dtype
        self.released: set[str] = set()
        self._offloaded: dict[str, torch.Tensor] = {}
        self.strip()
        # Decode CUDA graphs of this stage's part: GPU only (off on the CPU whatever is asked,
        # unless the tests' emulation is on, see stage_graphs.EMULATE_ENV).
        self.graphs: StageGraphs | None = None
        if (self.is_cuda or emulated()) and graph_max_bs > 0:
            self.graphs = StageGraphs(self, graph_max_bs)

    # -- ownership ------------------------------------------------------------------------------
    @property
    def pp_size(self) -> int:
        return len(self.bounds) - 1

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.pp_size - 1

    @property
    def layer_range(self) -> tuple[int, int]:
        return self.bounds[self.stage], self.bounds[self.stage + 1]

    def owns(self, name: str) -> bool:
        return names_owned(name, self.stage, self.bounds, self.tied)

    def _empty(self, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(0, dtype=like.dtype, device=like.device)

    def strip(self) -> None:
        """Gives back the memory of every parameter and KV buffer this stage does not own."""
        for name, param in self.model.named_parameters():
            if not self.owns(name):
                param.data = self._empty(param.data)
        start, end = self.layer_range
        for index, layer in enumerate(self.model.model.layers):
            if not start <= index < end:
                self._unfuse(layer)
                self.kv.k[index] = self._empty(self.kv.k[index])
                self.kv.v[index] = self._empty(self.kv.v[index])
        if self.is_cuda:
            torch.cuda.empty_cache()

    @staticmethod
    def _unfuse(layer: torch.nn.Module) -> None:
        layer.self_attn.qkv_weight = None
        layer.self_attn.qkv_bias = None
        layer.mlp.gate_up_weight = None

    def _fuse(self, layer: torch.nn.Module) -> None:
        if self.is_cuda:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()

    # -- one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def run_step(
        self, plan: StepPlan, first_ids: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[int, list[float]], list[list[float]]]:
        """This stage's part of a step. Returns (per micro-batch tokens, logprobs) on the last
        stage, prompt logprobs by item, and per micro-batch timings [layers s, extra s].
        `first_ids` (stage 0): the step's input ids on the device, decode rows filled in."""
        if self.mirror_table:
            for row, start, values in plan.table_writes:
                self.table.write(row, start, values)
            for row, floats, ints in plan.row_params:
                self.table.set_row_params(row, floats, ints)
            self.table.flush()
        self.samplers.update(plan.samplers)
        self._outputs = plan.outputs
        dev = self.device
        rows_t, pos_t, slots_t = upload_packed([plan.token_rows, plan.positions, plan.slots], dev)
        self.table.req_to_token[rows_t, pos_t] = slots_t.to(torch.int32)
        start, end = self.layer_range
        layers = self.model.model.layers[start:end]
        tokens: list[torch.Tensor] = []
        logprobs: list[torch.Tensor] = []
        input_lps: dict[int, list[float]] = {}
        pending: list[Any] = []
        marks: list[list[Any]] = []  # per micro-batch: embed, layers and head spans
        buckets: list[int | None] = [None] * len(plan.micro)
        if self.graphs is not None:
            # A step boundary: stale graphs go, missing buckets are captured (before any receive
            # touches the static inputs), and each decode micro-batch learns its bucket.
            buckets = self.graphs.prepare(plan.micro, plan.capture_graphs)
        for mb, bucket in zip(plan.micro, buckets, strict=True):
            if bucket is not None:
                marks.append(self._graphed(plan, mb, bucket, tokens, logprobs, pending))
                continue
            lo, hi = mb.tok_lo, mb.tok_hi
            span: list[Any] = []
            if self.is_first:
                span.append(self._mark())
                assert first_ids is not None
                hidden = self.model.embed(first_ids[lo:hi])
                residual = None
                span.append(self._mark())
            else:
                hidden = torch.empty((hi - lo, self.hidden_size), dtype=self.dtype, device=dev)
                residual = torch.empty_like(hidden)
                dist.recv(hidden, self.stage - 1, group=self.group)
                dist.recv(residual, self.stage - 1, group=self.group)
                span += [None, None]
            span.append(self._mark())
            meta, max_len = self._metadata(mb, slots_t[lo:hi])
            cos, sin = self.model.model.rotary(pos_t[lo:hi], max_position=max_len - 1)
            for layer in layers:
                hidden, residual = layer.forward_paged(hidden, residual, cos, sin, meta, self.kv)
            span.append(self._mark())
            if self.is_last:
                tok, lp = self._head(mb, hidden, residual, input_lps)
                tokens.append(tok)
                logprobs.append(lp)
                span.append(self._mark())
            else:
                assert residual is not None
                pending.append(dist.isend(hidden.contiguous(), self.stage + 1, group=self.group))
                pending.append(dist.isend(residual.contiguous(), self.stage + 1, group=self.group))
                span.append(span[-1])
            marks.append(span)
        for work in pending:
            work.wait()
        # Timings per micro-batch: [layers s, extra s]. On GPUs these are CUDA-event intervals
        # on the stage's stream, i.e. device time from the first kernel of the span to its last:
        # eagerly that includes the gaps while Python launches kernels (launch-bound stages read
        # as busy), with graphs it is the replay itself. With graphs, "layers" covers the
        # stage's layers (plus the embedding on stage 0, one gather inside its graph) and "extra"
        # the last stage's norm + LM head replay plus the eager sampler. Receive waits are
        # excluded (the start event runs after the received data arrived). The events are read
        # once per step, after every micro-batch was queued: the host then waits for the last
        # stage's tokens anyway, so this adds no synchronisation per micro-batch.
        timings = [
            [self._seconds(m[2], m[3]), self._seconds(m[0], m[1]) + self._seconds(m[3], m[4])]
            for m in marks
        ]
        return tokens, logprobs, input_lps, timings

    def _graphed(
        self,
        plan: StepPlan,
        mb: MicroBatch,
        bucket: int,
        tokens: list[torch.Tensor],
        logprobs: list[torch.Tensor],
        pending: list[Any],
    ) -> list[Any]:
        """One decode micro-batch through this stage's graphs; returns its timing marks."""
        graphs = self.graphs
        assert graphs is not None
        lo, hi = mb.tok_lo, mb.tok_hi
        n = hi - lo
        if not self.is_first:
            hidden_in, residual_in = graphs.receive(n)
            dist.recv(hidden_in, self.stage - 1, group=self.group)
            dist.recv(residual_in, self.stage - 1, group=self.group)
        t0 = self._mark()
        hidden, residual = graphs.run_layers(mb, plan.positions[lo:hi], plan.slots[lo:hi], bucket)
        t1 = self._mark()
        if not self.is_last:
            # Copies: the graph's outputs are overwritten by the bucket's next replay, which may
            # be queued before the transfer has read them.
            pending.append(dist.isend(hidden.clone(), self.stage + 1, group=self.group))
            pending.append(dist.isend(residual.clone(), self.stage + 1, group=self.group))
            return [None, None, t0, t1, t1]
        logits = graphs.run_head(n, bucket)
        tok, lp = self._sample(mb, logits)
        tokens.append(tok)
        logprobs.append(lp)
        return [None, None, t0, t1, self._mark()]

    def _mark(self) -> Any:
        """A point in this stage's timeline: a CUDA event in stream order on GPUs (no host sync,
        so the host keeps queueing while the device runs), the host clock on the CPU."""
        if not self.is_cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _seconds(self, start: Any, end: Any) -> float:
        if start is None or start is end:
            return 0.0
        if not self.is_cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def _metadata(self, mb: MicroBatch, slots: torch.Tensor) -> tuple[AttentionMetadata, int]:
        rows_t, ends_t, cu_t = upload_packed([mb.rows, mb.ends, mb.cu], self.device)
        max_len = int(mb.ends.max())
        n = len(mb.rows)
        meta = AttentionMetadata(
            slot_mapping=slots,
            block_table=self.table.req_to_token[rows_t, :max_len],
            seq_lens=ends_t.to(torch.int32),
            cu_q_lens=cu_t.to(torch.int32),
            page_size=1,
            is_decode=mb.num_decode == n,
            max_q_len=mb.max_q_len,
            num_decode=mb.num_decode,
        )
        return meta, max_len

    def _head(
        self,
        mb: MicroBatch,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        input_lps: dict[int, list[float]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Final norm, LM head and sampling for the micro-batch's emitting rows."""
        dev = self.device
        if len(mb.emit_rows) == 0 and mb.lp_plan is None:
            empty = torch.empty(0, device=dev)
            return empty.long(), empty.float()
        rows_idx = torch.from_numpy(mb.logit_rows).to(dev)
        hidden = hidden[rows_idx]
        norm = self.model.model.norm
        if residual is None:
            normed = rms_norm(hidden, norm.weight, norm.eps)
        else:
            normed, _ = add_rms_norm(hidden, residual[rows_idx], norm.weight, norm.eps)
        logits = self.model.lm_head(normed)
        if mb.lp_plan is not None:
            sample_index: list[int] = []
            cursor = 0
            for index, count, nxt, usable, emits in mb.lp_plan:
                if usable >= 0:
                    block = logits[cursor : cursor + count]
                    lp = torch.log_softmax(block[:usable].float(), dim=-1)
                    picked = lp.gather(1, torch.tensor(nxt[:usable], device=dev)[:, None])
                    input_lps[index] = picked.squeeze(1).tolist()
                    if emits:
                        sample_index.append(cursor + count - 1)
                    cursor += count
                else:
                    sample_index.append(cursor)
                    cursor += 1
            logits = logits[torch.tensor(sample_index, dtype=torch.int64, device=dev)]
        if len(mb.emit_rows) == 0:
            empty = torch.empty(0, device=dev)
            return empty.long(), empty.float()
        return self._sample(mb, logits)

    def _sample(self, mb: MicroBatch, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples the micro-batch's emitting rows from their logits (in order)."""
        views = [
            _RowView(self.samplers[int(r)], self._outputs.get(int(r), [])) for r in mb.emit_rows
        ]
        both = torch.from_numpy(np.stack([mb.emit_rows, mb.emit_next])).to(self.device)
        return self.sampler.sample(views, logits, both[0], both[1], mb.out_pos)

    # -- layer moves ----------------------------------------------------------------------------
    def _layer_params(self, layer_index: int) -> list[tuple[str, torch.nn.Parameter]]:
        prefix = f"model.layers.{layer_index}."
        layer = self.model.model.layers[layer_index]
        return [(prefix + n, p) for n, p in layer.named_parameters()]

    # A layer moves in two phases so serving continues while its KV travels:
    #   begin (step boundary k): the sender snapshots the layer's weights and the K/V of every
    #     slot in use and posts non-blocking sends (gloo: background threads; NCCL: its own
    #     stream); the receiver posts the matching receives into staging buffers. Steps keep
    #     running on the sender, which still owns the layer.
    #   end (boundary k + 1): the sender also sends the K/V of the slots written since (`delta`,
    #     the steps in between), the receiver installs weights + K/V, and ownership switches.
    _MIGRATION_TAG = 1

    def begin_move(self, layer_index: int, src: int, dst: int, used: np.ndarray) -> None:
        if self.stage not in (src, dst):
            return
        dev = self.device
        idx = torch.from_numpy(used).to(dev)
        if self.stage == src:
            tensors = [p.data.contiguous() for _, p in self._layer_params(layer_index)]
            tensors += [self.kv.k[layer_index][idx], self.kv.v[layer_index][idx]]
            post = dist.isend
        else:
            tensors = [
                torch.empty(self.shapes[name], dtype=p.dtype, device=dev)
                for name, p in self._layer_params(layer_index)
            ]
            shape = (len(used), *self.kv_shape[1:])
            tensors += [torch.empty(shape, dtype=self.kv_dtype, device=dev) for _ in range(2)]
            post = dist.irecv
        peer = dst if self.stage == src else src
        works = [post(t, peer, group=self.group, tag=self._MIGRATION_TAG) for t in tensors]
        self._migration = (layer_index, works, tensors, idx)

    def end_move(self, layer_index: int, src: int, dst: int, delta: np.ndarray) -> None:
        """Finishes the move begun at the previous boundary; every stage calls it."""
        if self.graphs is not None and self.stage in (src, dst):
            # Before the sender frees the layer: the graphs read the old range by address.
            self.graphs.invalidate(f"layer {layer_index} moved {src} -> {dst}")
        if self.stage in (src, dst):
            layer, works, tensors, idx = self._migration
            assert layer == layer_index, (layer, layer_index)
            self._migration = None
            for work in works:
                work.wait()
            dev = self.device
            didx = torch.from_numpy(delta).to(dev)
            k_cache, v_cache = self.kv.k, self.kv.v
            if self.stage == src:
                for t in (k_cache[layer_index][didx], v_cache[layer_index][didx]):
                    dist.send(t, dst, group=self.group, tag=self._MIGRATION_TAG)
                self._drop_layer(layer_index)
            else:
                shape = (len(delta), *self.kv_shape[1:])
                k_delta = torch.empty(shape, dtype=self.kv_dtype, device=dev)
                v_delta = torch.empty_like(k_delta)
                for t in (k_delta, v_delta):
                    dist.recv(t, src, group=self.group, tag=self._MIGRATION_TAG)
                *weights, k_used, v_used = tensors
                k = torch.zeros(self.kv_shape, dtype=self.kv_dtype, device=dev)
                v = torch.zeros_like(k)
                k[idx], v[idx] = k_used, v_used
                k[didx], v[didx] = k_delta, v_delta  # written after the snapshot: newer
                k_cache[layer_index], v_cache[layer_index] = k, v
                for (_, param), data in zip(self._layer_params(layer_index), weights, strict=True):
                    param.data = data
                self._fuse(self.model.model.layers[layer_index])
        b = list(self.bounds)
        if dst == src - 1:
            b[src] += 1
        else:
            b[dst] -= 1
        self.bounds = tuple(b)

    def _drop_layer(self, layer_index: int) -> None:
        for _, param in self._layer_params(layer_index):
            param.data = self._empty(param.data)
        self._unfuse(self.model.model.layers[layer_index])
        self.kv.k[layer_index] = self._empty(self.kv.k[layer_index])
        self.kv.v[layer_index] = self._empty(self.kv.v[layer_index])

    # -- weights and memory ---------------------------------------------------------------------
    def load_weights(self, named: list[tuple[str, torch.Tensor]]) -> int:
        """Loads the named tensors this stage owns (callers validated names and shapes)."""
        mine = [(n, t) for n, t in named if self.owns(n)]
        return load_named_tensors(self.model, mine) if mine else 0

    def release(self, tags: list[str]) -> None:
        if self.graphs is not None and {"weights", "kv_cache", "cuda_graph"} & set(tags):
            # Before any buffer goes: the graphs read them by address.
            self.graphs.invalidate(f"memory released ({sorted(tags)})")
        if "weights" in tags and "weights" not in self.released:
            for name, param in self.model.named_parameters():
                if param.numel():
                    self._offloaded[name] = param.data.to("cpu", copy=True)
                    param.data = self._empty(param.data)
            for layer in self.model.model.layers:
                self._unfuse(layer)
        if "kv_cache" in tags and "kv_cache" not in self.released:
            start, end = self.layer_range
            for i in range(start, end):
                self.kv.k[i] = self._empty(self.kv.k[i])
                self.kv.v[i] = self._empty(self.kv.v[i])
        self.released |= set(tags) & {"weights", "kv_cache", "cuda_graph"}
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def resume(self, tags: list[str]) -> None:
        if "weights" in tags and "weights" in self.released:
            params = dict(self.model.named_parameters())
            for name, saved in self._offloaded.items():
                params[name].data = saved.to(self.device)
            self._offloaded.clear()
            if self.tied:
                self.model.lm_head.weight = self.model.model.embed_tokens.weight
            start, end = self.layer_range
            for i in range(start, end):
                self._fuse(self.model.model.layers[i])
            self.released.discard("weights")
        if "kv_cache" in tags and "kv_cache" in self.released:
            start, end = self.layer_range
            for i in range(start, end):
                self.kv.k[i] = torch.zeros(self.kv_shape, dtype=self.kv_dtype, device=self.device)
                self.kv.v[i] = torch.zeros(self.kv_shape, dtype=self.kv_dtype, device=self.device)
            self.released.discard("kv_cache")
        if "cuda_graph" in tags:
            self.released.discard("cuda_graph")  # graphs are captured again when a step needs them

    def graphs_command(self, command: dict[str, Any]) -> None:
        """Stage 0's graph commands: "reset" (drop), "capture" (every bucket now), "enable"."""
        if self.graphs is None:
            return
        action = command["action"]
        if action == "reset":
            self.graphs.invalidate(command.get("reason", "reset"))
        elif action == "capture":
            self.graphs.capture_all()
        elif action == "enable":
            # A stage whose capture failed stays eager (see StageGraphs._try_capture).
            self.graphs.enabled = bool(command["on"]) and self.graphs.failed is None
        else:
            raise ValueError(f"unknown graphs action {action!r}")

    def graph_stats(self) -> dict[str, Any] | None:
        return None if self.graphs is None else self.graphs.stats()
