"""The runner: owns the device state and turns a scheduled batch into a launched step.

Device state lives here and nowhere else: the parameters (through the model), the KV buffers,
the device side of the request tables, the CUDA graphs and their staging buffers. `launch(batch)`
queues one forward + sampling and returns a handle; on a GPU it does not wait for the device, so
the engine can schedule the next step while this one runs. `release(tags)` / `resume(tags)` give
memory back and take it again (SGLang's tags: weights, kv_cache, cuda_graph); since a graph holds
the addresses of the buffers it reads, releasing weights or KV drops the graphs, and resuming
captures them again once weights and KV are both back.

Graphs: decode-only steps replay decode graphs (by batch size); prefill chunks replay
prefill-chunk graphs (by token count, `prefill_graph_tokens` at most), alone in a prefill-only
step, and right after the decode graph in a mixed step (its decode rows and prefill items as
two replays, then one sampling pass). Whatever the graphs cannot run (prompt logprobs, drafts,
KV reuse, more items or tokens than captured) runs as one eager forward.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from rollout_accel.serving.engine.batch import (
    Batch,
    CompletedStep,
    QueuedStep,
    StepHandle,
    StepResult,
    host_input_ids,
    pack_layout,
    upload_packed,
)
from rollout_accel.serving.engine.cuda_graphs import DecodeGraphs, emulated
from rollout_accel.serving.engine.kv_pool import RequestTable
from rollout_accel.serving.engine.logprob_options import record_input
from rollout_accel.serving.engine.prefill_graphs import PrefillGraphs, StagedPrefill
from rollout_accel.serving.engine.sampler import BatchSampler
from rollout_accel.serving.models.decoder import CausalLM
from rollout_accel.serving.models.paged_kv import AttentionMetadata, PagedKVCache
from rollout_accel.serving.spec.verify_step import launch_verify

log = logging.getLogger(__name__)

MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")


class MemoryReleasedError(RuntimeError):
    """A step was launched while weights or KV buffers are released."""


class ModelRunner:
    """Launches steps over the model and the paged KV cache; owns all device state."""

    def __init__(
        self,
        model: CausalLM,
        kv_cache: PagedKVCache,
        table: RequestTable,
        eos_ids: tuple[int, ...],
        cuda_graph_max_bs: int = 0,
        prefill_graph_tokens: int = 0,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.table = table
        self.device = next(model.parameters()).device
        self.is_cuda = self.device.type == "cuda"
        self.vocab_size = model.config.vocab_size
        self.sampler = BatchSampler(table, self.vocab_size, eos_ids)
        self.graphs: DecodeGraphs | None = None
        self.chunk_graphs: PrefillGraphs | None = None  # prefill-chunk graphs (whole GPU)
        self.graphed_prefill_steps = 0  # steps whose prefill part replayed a chunk graph
        self.use_chunk_graphs = True  # runtime switch (benchmarks compare with eager steps)
        self.kvreuse: Any = None  # serving.kvreuse.engine_hook.KVReuse when enabled
        if (self.is_cuda or emulated(self.device)) and cuda_graph_max_bs > 0:
            self.graphs = DecodeGraphs(model, kv_cache, table, cuda_graph_max_bs)
            self.graphs.capture()
            if prefill_graph_tokens > 0:
                self.chunk_graphs = PrefillGraphs(model, kv_cache, table, prefill_graph_tokens)
                self.chunk_graphs.capture()
        self._offloaded: dict[str, torch.Tensor] = {}
        self.released: set[str] = set()
        if self.is_cuda:
            # Two pinned result buffers, alternated: step N's results may still be copying while
            # step N+1 is launched. Tokens and logprobs travel together as float64 (token ids
            # are exact in it): one device-to-host copy per step.
            self._results = [
                torch.zeros(2 * table.max_rows, dtype=torch.float64).pin_memory() for _ in range(2)
            ]
            self._flip = 0

    # -- launching ------------------------------------------------------------------------------
    @torch.inference_mode()
    def launch(self, batch: Batch) -> StepHandle:
        """Queues the batch's forward and sampling; the handle's `wait()` gives the results."""
        if self.released & {"weights", "kv_cache"}:
            raise MemoryReleasedError(
                f"memory is released ({sorted(self.released)}); resume_memory_occupation first"
            )
        self.table.flush()
        items = batch.items
        if items and items[-1].draft is not None:  # verify rows come last (serving/spec)
            return launch_verify(self, batch)
        emitting = [i for i, it in enumerate(items) if it.emits_token]
        if batch.is_decode_only and self.graphs is not None and self.graphs.fits(len(items)):
            positions = np.fromiter((it.start for it in items), np.int64, len(items))
            sample_logits = self.graphs.run(positions, batch.rows, batch.slots)
            bs = len(items)
            emit_rows, emit_next = self.graphs.rows[:bs], self.graphs.positions[:bs] + 1
            input_logprobs: dict[int, list[float]] = {}
        elif self.kvreuse is not None and self.kvreuse.handles(batch):
            sample_logits, emit_rows, emit_next, input_logprobs = self.kvreuse.forward(batch)
        elif (parts := self._chunk_graphable_parts(batch)) is not None:
            return self._launch_graphed_parts(batch, *parts)
        else:
            sample_logits, emit_rows, emit_next, input_logprobs = self._forward_eager(
                batch, emitting
            )
        if not emitting:
            return CompletedStep(batch, StepResult([], [], input_logprobs))
        tokens, logprobs = self._sample(batch, emitting, sample_logits, emit_rows, emit_next)
        return self._results_handle(batch, tokens, logprobs, input_logprobs)

    # -- graphed prefill chunks ------------------------------------------------------------------
    def _chunk_graphable_parts(self, batch: Batch) -> tuple[Batch, Batch] | None:
        """The batch's (decode, prefill) parts when the prefill part fits the chunk graphs and
        the decode rows (if any) the decode graphs (asked after drafts and KV reuse took
        theirs); else None."""
        if (
            self.chunk_graphs is None
            or self.graphs is None
            or not self.use_chunk_graphs
            or "cuda_graph" in self.released
        ):
            return None
        nd = batch.num_decode
        if nd == len(batch.items) or (nd and not self.graphs.fits(nd)):
            return None
        parts = self._parts(batch)
        return parts if self.chunk_graphs.fits(parts[1]) else None

    @staticmethod
    def _parts(batch: Batch) -> tuple[Batch, Batch]:
        """The decode rows and the prefill items as two batches."""
        nd = batch.num_decode
        decode = Batch(batch.items[:nd], batch.slots[:nd], nd, nd, batch.rows[:nd])
        slots = batch.slots[nd:]
        prefill = Batch(batch.items[nd:], slots, 0, len(slots), batch.rows[nd:])
        return decode, prefill

    def _launch_graphed_parts(self, batch: Batch, decode: Batch, prefill: Batch) -> StepHandle:
        """The decode rows' graph (if any), then the prefill chunk's graph, on the current
        stream; one sampling pass over both. Table writes were flushed."""
        d_graphs, p_graphs = self.graphs, self.chunk_graphs
        assert d_graphs is not None and p_graphs is not None
        self.graphed_prefill_steps += 1
        d_bucket, staged = self._stage_parts(decode, prefill, d_graphs, p_graphs)
        if d_bucket is not None:
            d_graphs.replay(d_bucket)
        p_graphs.replay(staged.bucket)
        return self._sample_parts(batch, decode, prefill, d_graphs, d_bucket, p_graphs, staged)

    @staticmethod
    def _stage_parts(
        decode: Batch, prefill: Batch, d_graphs: DecodeGraphs, p_graphs: PrefillGraphs
    ) -> tuple[int | None, StagedPrefill]:
        """Both parts' inputs into their graphs' static buffers, on the current stream; the
        decode bucket (None without decode rows) and the staged chunk. Replays may then run
        here or on other streams (SM sharing's partitions)."""
        d_bucket = None
        nd = len(decode.items)
        if nd:
            positions = np.fromiter((it.start for it in decode.items), np.int64, nd)
            d_bucket = d_graphs.stage(positions, decode.rows, decode.slots)
        return d_bucket, p_graphs.stage(prefill)

    def _sample_parts(
        self,
        batch: Batch,
        decode: Batch,
        prefill: Batch,
        d_graphs: DecodeGraphs,
        d_bucket: int | None,
        p_graphs: PrefillGraphs,
        staged: StagedPrefill,
    ) -> StepHandle:
        """Samples a two-part step's emitting items (decode rows first, then the prefill items
        that end their prompt) from the replays' outputs; one results handle."""
        nd = len(decode.items)
        tokens: list[torch.Tensor] = []
        logprobs: list[torch.Tensor] = []
        if d_bucket is not None:
            d_logits = d_graphs.outputs[d_bucket][:nd]
            d_rows, d_next = d_graphs.rows[:nd], d_graphs.positions[:nd] + 1
            d_tok, d_lp = self._sample(decode, list(range(nd)), d_logits, d_rows, d_next)
            tokens.append(d_tok)
            logprobs.append(d_lp.float())
        if staged.emitting:
            p_logits = p_graphs.logits(staged)
            p_tok, p_lp = self._sample(
                prefill, staged.emitting, p_logits, staged.emit_rows, staged.emit_next
            )
            tokens.append(p_tok)
            logprobs.append(p_lp.float())
        if not tokens:
            return CompletedStep(batch, StepResult([], [], {}))
        if len(tokens) == 1:
            return self._results_handle(batch, tokens[0], logprobs[0], {})
        return self._results_handle(batch, torch.cat(tokens), torch.cat(logprobs), {})

    def _sample(
        self,
        batch: Batch,
        emitting: list[int],
        logits: torch.Tensor,
        emit_rows: torch.Tensor,
        emit_next: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples the emitting items' tokens (device tensors) and writes them into the device
        token table, where the next decode step reads them."""
        items = batch.items
        requests = [items[i].request for i in emitting]
        host_positions = np.fromiter(
            (items[i].start + items[i].count - len(items[i].request.input_ids) for i in emitting),
            np.int64,
            len(emitting),
        )
        tokens, logprobs = self.sampler.sample(
            requests, logits, emit_rows, emit_next, host_positions
        )
        self.table.token_ids[emit_rows, emit_next] = tokens
        return tokens, logprobs

    def _results_handle(
        self,
        batch: Batch,
        tokens: torch.Tensor,
        logprobs: torch.Tensor,
        input_logprobs: dict[int, list[float]],
    ) -> StepHandle:
        """The step's handle: results on the host at once (CPU), or one pinned copy behind an
        event (GPU; the caller keeps going)."""
        if not self.is_cuda:
            return CompletedStep(
                batch, StepResult(tokens.tolist(), logprobs.tolist(), input_logprobs)
            )
        self._flip ^= 1
        host = self._results[self._flip]
        count = int(tokens.numel())
        # A contiguous prefix of the pinned buffer: a copy into a strided slice would go through
        # a pageable temporary and block until this step finishes (no overlap at all).
        packed = host[: 2 * count].view(2, count)
        packed.copy_(torch.stack([tokens.double(), logprobs.double()]), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return QueuedStep(batch, packed, event, count, input_logprobs)

    def _forward_eager(
        self, batch: Batch, emitting: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[int, list[float]]]:
        """A forward without graphs. Returns the logits of the emitting items' last tokens, the
        device rows and next positions of those items, and the prompt logprobs of the items that
        asked for them."""
        items = batch.items
        nd = batch.num_decode
        dev = self.device
        layout = pack_layout(items)
        counts, ends, cu, positions = layout.counts, layout.ends, layout.cu, layout.positions
        # Host-known input ids; decode rows read theirs from the token table.
        ids = host_input_ids(items, layout, nd)
        lp_items = [i for i, it in enumerate(items) if it.wants_input_logprobs]
        if lp_items:
            # Prompt-logprob items need every row's logits; the others their last row.
            logit_rows: list[int] = []
            for index, it in enumerate(items):
                lo, hi = int(cu[index]), int(cu[index + 1])
                if it.wants_input_logprobs:
                    logit_rows.extend(range(lo, hi))
                elif it.emits_token:
                    logit_rows.append(hi - 1)
            logit_np = np.asarray(logit_rows, dtype=np.int64)
        else:
            logit_np = (cu[1:] - 1)[emitting]
        emit = np.asarray(emitting, dtype=np.int64)
        token_rows = np.repeat(batch.rows, counts)
        parts = [ids, positions, batch.rows, ends, cu, batch.slots.numpy(), logit_np]
        parts += [batch.rows[emit], ends[emit], token_rows]
        views = upload_packed(parts, dev)
        ids_t, pos_t, rows_t, ends_t, cu_t, slots_t, logit_rows_t, emit_rows, emit_next = views[:9]
        # The batch's new slots into the device table (the scheduler kept the host mirror).
        self.table.req_to_token[views[9], pos_t] = slots_t.to(torch.int32)
        if nd:
            ids_t = ids_t.clone()
            ids_t[:nd] = self.table.token_ids[rows_t[:nd], pos_t[:nd]]
        max_len = int(ends.max())
        meta = AttentionMetadata(
            slot_mapping=slots_t,
            block_table=self.table.req_to_token[rows_t, :max_len],
            seq_lens=ends_t.to(torch.int32),
            cu_q_lens=cu_t.to(torch.int32),
            page_size=1,
            is_decode=batch.is_decode_only,
            max_q_len=int(counts.max()),
            num_decode=nd,
        )
        logits = self.model.forward_paged(
            ids_t, pos_t, meta, self.kv_cache, logit_rows=logit_rows_t, max_position=max_len - 1
        )
        if not lp_items:
            return logits, emit_rows, emit_next, {}
        input_logprobs: dict[int, list[float]] = {}
        sample_index: list[int] = []
        cursor = 0
        for index, it in enumerate(items):
            if it.wants_input_logprobs:
                block = logits[cursor : cursor + it.count]
                req = it.request
                nxt = req.token_slice(it.start + 1, it.start + it.count + 1)
                usable = min(len(nxt), it.count, len(req.input_ids) - it.start - 1)
                lp = torch.log_softmax(block[:usable].float(), dim=-1)
                picked = lp.gather(1, torch.tensor(nxt[:usable], device=lp.device)[:, None])
                input_logprobs[index] = picked.squeeze(1).tolist()
                record_input(req, lp, it.start + 1)
                if it.emits_token:
                    sample_index.append(cursor + it.count - 1)
                cursor += it.count
            elif it.emits_token:
                sample_index.append(cursor)
                cursor += 1
        sample_logits = logits[torch.tensor(sample_index, dtype=torch.int64, device=dev)]
        return sample_logits, emit_rows, emit_next, input_logprobs

    # -- memory ---------------------------------------------------------------------------------
    def release(self, tags: list[str]) -> None:
        """Gives memory back. Weights go to host memory; KV contents are dropped (the caller
        flushed the prefix cache); graphs go whenever weights or KV move."""
        if ("weights" in tags or "kv_cache" in tags or "cuda_graph" in tags) and self.graphs:
            self.graphs.release()
            if self.chunk_graphs is not None:
                self.chunk_graphs.release()
            if getattr(self, "verify_graphs", None) is not None:  # serving/spec
                self.verify_graphs.release()
        if "weights" in tags and "weights" not in self.released:
            for name, param in self.model.named_parameters():
                self._offloaded[name] = param.data.to("cpu", copy=True)
                param.data = torch.empty(0, dtype=param.dtype, device=param.device)
            self.model.drop_fused_projections()  # they own the storage; `resume` re-fuses
        if "kv_cache" in tags and not self.kv_cache.released:
            self.kv_cache.release()
        self.released |= set(tags)
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def resume(self, tags: list[str]) -> None:
        """Takes memory again; graphs are captured anew once weights and KV are both back."""
        if "weights" in tags and "weights" in self.released:
            for name, param in self.model.named_parameters():
                param.data = self._offloaded[name].to(self.device)
            self._offloaded.clear()
            if self.model.config.tie_word_embeddings:
                self.model.lm_head.weight = self.model.model.embed_tokens.weight
            if self.is_cuda:
                self.model.fuse_projections()
        if "kv_cache" in tags and self.kv_cache.released:
            self.kv_cache.reallocate()
        self.released -= set(tags)
        self.recapture_if_needed()

    def close(self) -> None:
        """Frees all device memory the runner holds (engine shutdown): the engine and the
        scheduler reference each other, so waiting for the garbage collector could keep tens of
        GB of KV alive after `shutdown()`."""
        if self.graphs is not None:
            self.graphs.release()
        if self.chunk_graphs is not None:
            self.chunk_graphs.release()
        if getattr(self, "verify_graphs", None) is not None:  # serving/spec
            self.verify_graphs.release()
        if not self.kv_cache.released:
            self.kv_cache.release()
        for param in self.model.parameters():
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        self.model.drop_fused_projections()
        self.released |= {"weights", "kv_cache", "cuda_graph"}
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def recapture_if_needed(self, force: bool = False) -> None:
        """(Re)captures the decode and prefill-chunk graphs when they are missing (or `force`)
        and memory is in."""
        if self.graphs is None or self.released & {"weights", "kv_cache", "cuda_graph"}:
            return
        if force or not self.graphs.captured:
            self.graphs.capture()
            log.info("captured decode CUDA graphs (%d buckets)", len(self.graphs.buckets))
        if self.chunk_graphs is not None and (force or not self.chunk_graphs.captured):
            self.chunk_graphs.capture()
            log.info(
                "captured prefill-chunk CUDA graphs (%d buckets)", len(self.chunk_graphs.buckets)
            )
