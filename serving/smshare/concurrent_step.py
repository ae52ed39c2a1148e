"""`SmShareRunner`: a mixed step's decode rows and prefill chunk run at once on disjoint SMs.

The scheduler already builds mixed batches (the first `num_decode` items are decode rows, the
rest prefill chunks). For such a batch this runner asks the planner for a split; with a preset:
  1. on the main stream: pending table writes, then both parts' inputs staged into the static
     buffers of their graphs (pinned host -> device copies), then an event;
  2. the preset's decode stream waits for that event and replays the decode graph captured ON it;
     the prefill stream waits for it and replays the prefill-chunk graph captured on it
     (`prefill_graphs.py`); each stream then records its partition's own event;
  3. the main stream waits for both partition events, samples both parts, writes the tokens into
     the device token table and copies the results to the host as `ModelRunner` does: one handle,
     tokens in item order (decode rows first).
Partition streams run ONLY graph replays and event records/waits. Eager work there allocates
from torch's caching allocators on a green context's stream and their event bookkeeping runs in
the primary context; on the H200 freeing such a tensor aborted the process ("invalid device
context" from the event record). Replays allocate nothing, every tensor a step allocates lives
on the main stream, and the event each partition stream records was created in its own green
context (`Partition.record_done`), so no torch-managed event or block ever touches those streams.
KV is zero-copy: one pool. The two parts touch disjoint rows and slots (every slot a step writes
was allocated for this step), and every step starts after the previous step's streams joined the
main stream, so a prefill's KV is complete before any later decode step reads it.

Why the join per step: the scheduler processes a step as one unit, so decode rows see the whole
step as their time per token; the planner weighs that (see planner.py).

Everywhere SM sharing is unavailable (CPU, no green contexts, no CUDA graphs, failed start-up),
for decode-only or prefill-only batches, and for mixed steps the graphs cannot run (prompt
logprobs, more prefill items or tokens than captured), `launch` IS `ModelRunner.launch`. Mode
`split` runs the two parts one after the other on the current stream, eagerly (the decomposition
without concurrency, runnable on the CPU).

Mode `sequential` is the baseline that isolates what concurrency buys: `ModelRunner`'s own path
for a graphable mixed step (its whole-GPU decode graph, then its prefill-chunk graph, on the main
stream), chosen through the planner so its steps are timed and recorded like the others. It is
also what the planner's whole-GPU option runs. Mode `time-share` is `ModelRunner.launch` itself
(the same two replays when the step is graphable, else one eager forward); `eager` bypasses the
chunk graphs (one eager forward per mixed step: the engine before prefill-chunk graphs).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from rollout_accel.serving.engine.batch import (
    Batch,
    StepHandle,
)
from rollout_accel.serving.engine.config import EngineConfig
from rollout_accel.serving.engine.cuda_graphs import DecodeGraphs
from rollout_accel.serving.engine.kv_pool import RequestTable
from rollout_accel.serving.engine.model_runner import MEMORY_TAGS, ModelRunner
from rollout_accel.serving.engine.prefill_graphs import PrefillGraphs
from rollout_accel.serving.models.decoder import CausalLM
from rollout_accel.serving.models.paged_kv import PagedKVCache
from rollout_accel.serving.smshare.partitions import (
    DEFAULT_DECODE_SMS,
    PartitionSet,
    Preset,
    log_once,
    open_partitions,
)
from rollout_accel.serving.smshare.planner import (
    WHOLE,
    LatencyModel,
    LatencyTable,
    PlanChoice,
    Planner,
)

log = logging.getLogger(__name__)

MODES = ("adaptive", "static", "sequential", "time-share", "eager", "split")
METRICS_LOG_INTERVAL_S = 60.0  # how often the chosen presets are logged


class StreamDecodeGraphs(DecodeGraphs):
    """Decode graphs captured on a given stream (a partition's): replays stay on its SMs."""

    def __init__(
        self,
        model: CausalLM,
        kv_cache: PagedKVCache,
        table: RequestTable,
        max_bs: int,
        stream: torch.cuda.Stream,
    ) -> None:
        super().__init__(model, kv_cache, table, max_bs)
        self.stream = stream

    def _capture_stream(self) -> torch.cuda.Stream:
        return self.stream


@dataclass(slots=True)
class StepRecord:
    """One mixed step's plan, for the preset timeline."""

    time: float
    preset: str
    decode_rows: int
    context_tokens: int
    prefill_tokens: int
    predicted_s: float
    measured_s: float = 0.0  # GPU time of the step, filled in once it completed


class SmShareRunner(ModelRunner):
    """`ModelRunner` that runs mixed steps' decode and prefill concurrently on SM partitions.

    `mode`: adaptive (the planner chooses per step), static (always `static_preset` when both
    sides have work), sequential (both parts' graphs one after the other on the whole GPU,
    through the planner so steps are timed), time-share (`ModelRunner.launch` as is), eager (one
    merged eager forward per mixed step), split (eager decomposition).
    The whole-GPU graphs are `ModelRunner`'s (`graphs`, `chunk_graphs`).
    `available` is False with `unavailable_reason` set where sharing cannot run.
    """

    def __init__(
        self,
        model: CausalLM,
        kv_cache: PagedKVCache,
        table: RequestTable,
        eos_ids: tuple[int, ...],
        cuda_graph_max_bs: int = 0,
        prefill_graph_tokens: int = 0,
        *,
        tpot_ms: float = 50.0,
        max_prefill_tokens: int = 4096,
        decode_sms: tuple[int, ...] = DEFAULT_DECODE_SMS,
        mode: str = "adaptive",
        profile: bool = True,
    ) -> None:
        self.partitions: PartitionSet | None = None
        self.preset_graphs: dict[int, StreamDecodeGraphs] = {}
        self.prefill_graphs: dict[int, PrefillGraphs] = {}
        self.planner: Planner | None = None
        self.unavailable_reason: str | None = None
        self.timeline: deque[StepRecord] = deque(maxlen=200_000)
        self._timings: deque[tuple[PlanChoice, StepRecord, torch.cuda.Event, torch.cuda.Event]]
        self._timings = deque()
        self.latency_table: LatencyTable | None = None
        self._mode = "time-share"
        self._logged_at = time.perf_counter()
        self.split_steps = 0  # mixed steps run as two parts (concurrently or in split mode)
        self.concurrent_steps = 0  # of which on partition streams at once
        self.sequential_steps = 0  # of which as two whole-GPU graph replays in turn
        self.ungraphable_steps = 0  # mixed steps time-shared because the graphs cannot run them
        if not tpot_ms > 0:
            raise ValueError(f"sm_share_tpot_ms: must be positive, got {tpot_ms}")
        self.tpot_s = tpot_ms / 1e3
        # The whole-GPU option replays ModelRunner's prefill-chunk graphs; with sm_share the
        # config asks for them up to max_prefill_tokens (EngineConfig.prefill_graph_tokens).
        super().__init__(model, kv_cache, table, eos_ids, cuda_graph_max_bs, prefill_graph_tokens)
        self.set_mode("split" if mode == "split" else "time-share")
        if not self.is_cuda:
            self._unavailable(f"device is {self.device.type}, not cuda")
            return
        if self.graphs is None or self.chunk_graphs is None:
            self._unavailable("needs CUDA graphs (cuda_graph=True) for decode and prefill chunks")
            return
        partitions, reason = open_partitions(self.device, decode_sms)
        if partitions is None:
            self.unavailable_reason = reason
            return
        self.partitions = partitions
        try:
            self._start(max_prefill_tokens, profile)
        except Exception as exc:  # any start-up failure: run as today, say why once
            log.exception("SM sharing start-up failed")
            self._teardown()
            self._unavailable(f"start-up failed: {exc}")
            return
        self.set_mode(mode)

    # -- start-up -------------------------------------------------------------------------------
    def _start(self, max_prefill_tokens: int, profile: bool) -> None:
        from rollout_accel.serving.smshare.profile import profile_latency, synthetic_table

        assert self.partitions is not None and self.graphs is not None
        began = time.perf_counter()
        for preset in self.partitions.presets:
            graphs = StreamDecodeGraphs(
                self.model, self.kv_cache, self.table, self.graphs.max_bs, preset.decode.stream
            )
            graphs.capture()
            self.preset_graphs[preset.index] = graphs
            prefill = PrefillGraphs(
                self.model, self.kv_cache, self.table, max_prefill_tokens, preset.prefill.stream
            )
            prefill.capture()
            self.prefill_graphs[preset.index] = prefill
        self._check_join()
        if profile:
            table = profile_latency(self, max_prefill_tokens)
        else:
            table = synthetic_table(self.partitions, self.graphs.max_bs, max_prefill_tokens)
        self.planner = Planner(LatencyModel(table), self.tpot_s)
        self.latency_table = table
        log.info(
            "SM sharing on: presets %s (prefill/decode SMs of %d), ready in %.1f s",
            self.partitions.describe(),
            self.partitions.total_sms,
            time.perf_counter() - began,
        )

    def _check_join(self) -> None:
        """Empty concurrent steps on every preset (events only): the fork and the join work
        with these streams (else start-up fails here, not in a served step)."""
        assert self.partitions is not None
        main = torch.cuda.current_stream(self.device)
        for _ in range(2):
            for preset in self.partitions.presets:
                self._fork(main, preset)
                self._join(main, preset)
        torch.cuda.synchronize(self.device)

    def _unavailable(self, reason: str) -> None:
        self.unavailable_reason = reason
        log_once(f"SM sharing unavailable ({reason}); prefill and decode time-share the GPU")

    def _teardown(self) -> None:
        for graphs in [*self.preset_graphs.values(), *self.prefill_graphs.values()]:
            graphs.release()
        self.preset_graphs.clear()
        self.prefill_graphs.clear()
        self.planner = None
        if self.partitions is not None:
            partitions, self.partitions = self.partitions, None
            try:
                partitions.close()
            except Exception:
                log.exception("closing green contexts failed")

    # -- modes ----------------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        return self.planner is not None and self.partitions is not None

    @property
    def mode(self) -> str:
        return self._mode

    def set_mode(self, mode: str, static_preset: int | None = None) -> None:
        """Switches how mixed steps run (call between steps, e.g. through `EngineLoop.call`).
        Without partitions only `time-share` and `split` exist; others fall back to time-share."""
        if mode not in MODES:
            raise ValueError(f"sm_share mode {mode!r}: expected one of {MODES}")
        if mode in ("static", "adaptive", "sequential"):
            if self.planner is None:
                mode = "time-share"
            else:
                if mode == "static" and static_preset is None:
                    raise ValueError("sm_share mode 'static' needs static_preset")
                fixed = {"static": static_preset, "sequential": WHOLE}.get(mode)
                learnt = dict(self.planner.correction)
                self.planner = Planner(self.planner.model, self.tpot_s, fixed)
                self.planner.correction.update(learnt)  # what served steps taught is kept
        self._timings.clear()
        self._mode = mode
        self.use_chunk_graphs = mode != "eager"

    def metrics(self) -> dict[str, float]:
        return self.planner.metrics() if self.planner is not None else {}

    # -- launching ------------------------------------------------------------------------------
    @torch.inference_mode()
    def launch(self, batch: Batch) -> StepHandle:
        nd = batch.num_decode
        mixed = 0 < nd < len(batch.items)
        if (
            not mixed
            or self._mode in ("time-share", "eager")
            or self.released & {"weights", "kv_cache"}
        ):
            return super().launch(batch)
        if self._mode == "split":
            return self._launch_parts(batch, None)
        assert self.planner is not None and self.partitions is not None
        parts = self._graphable_parts(batch)
        if parts is None:
            self.ungraphable_steps += 1
            return super().launch(batch)
        context = int(sum(it.start + 1 for it in batch.items[:nd]))
        self._poll_timings()
        choice: PlanChoice = self.planner.choose(nd, context, batch.num_tokens - nd)
        now = time.perf_counter()
        if now - self._logged_at > METRICS_LOG_INTERVAL_S:
            self._logged_at = now
            log.info("SM sharing (%s): %s", self._mode, self.planner.metrics())
        preset = None if choice.preset is None else self.partitions.presets[choice.preset]
        record = StepRecord(
            time.perf_counter(),
            self.planner.name(choice.preset),
            nd,
            context,
            batch.num_tokens - nd,
            choice.predicted_s,
        )
        self.timeline.append(record)
        # Timing events on the main stream bracket the whole step (both parts are joined into
        # it): what the step cost on the GPU, fed back to the planner once it completed.
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        handle = self._launch_graphed(batch, preset, *parts)
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._timings.append((choice, record, start, end))
        return handle

    def _poll_timings(self) -> None:
        """Feeds completed steps' GPU times to the planner (never waits for the GPU)."""
        while self._timings and self._timings[0][3].query():
            choice, record, start, end = self._timings.popleft()
            record.measured_s = start.elapsed_time(end) / 1e3
            if self.planner is not None:
                self.planner.observe(choice, record.measured_s)
        while len(self._timings) > 64:
            self._timings.popleft()

    def _graphable_parts(self, batch: Batch) -> tuple[Batch, Batch] | None:
        """This mixed batch's (decode, prefill) parts when both can run as graph replays (every
        preset captured the same shapes, so the first preset's graphs answer for all); else
        None."""
        if self.released & {"weights", "kv_cache", "cuda_graph"} or not self.prefill_graphs:
            return None
        items = batch.items
        nd = batch.num_decode
        if items[-1].draft is not None or (
            self.kvreuse is not None and self.kvreuse.handles(batch)
        ):
            return None
        decode_graphs = next(iter(self.preset_graphs.values()))
        prefill_graphs = next(iter(self.prefill_graphs.values()))
        parts = self._parts(batch)
        return parts if decode_graphs.fits(nd) and prefill_graphs.fits(parts[1]) else None

    def _launch_parts(self, batch: Batch, preset: Preset | None) -> StepHandle:
        """Split mode: the decode rows, then the prefill items, on the current stream (eager
        prefill; the reference decomposition, runnable on the CPU)."""
        del preset
        if self.released & {"weights", "kv_cache"}:
            return super().launch(batch)  # raises MemoryReleasedError
        self.table.flush()
        self.split_steps += 1
        nd = batch.num_decode
        decode, prefill = self._parts(batch)
        d_tokens, d_logprobs, _ = self._forward_sample(decode, self.graphs)
        p_tokens, p_logprobs, p_input = self._forward_sample(prefill, None)
        input_logprobs = {nd + index: values for index, values in p_input.items()}
        assert d_tokens is not None and d_logprobs is not None  # every decode row emits
        return self._joined_handle(
            batch, d_tokens, d_logprobs, p_tokens, p_logprobs, input_logprobs
        )

    def _launch_graphed(
        self, batch: Batch, preset: Preset | None, decode: Batch, prefill: Batch
    ) -> StepHandle:
        """Both parts as graph replays: at once on `preset`'s partitions (see the module doc),
        or, with no preset, one after the other on the whole GPU (`ModelRunner`'s path)."""
        self.table.flush()
        self.split_steps += 1
        if preset is None:
            self.sequential_steps += 1
            return self._launch_graphed_parts(batch, decode, prefill)
        self.concurrent_steps += 1
        self.graphed_prefill_steps += 1
        d_graphs = self.preset_graphs[preset.index]
        p_graphs = self.prefill_graphs[preset.index]
        main = torch.cuda.current_stream(self.device)
        # Staging on the main stream: the pinned buffers and the copies never meet a partition
        # stream (stage() may also recapture stale graphs: that synchronizes, before the fork).
        d_bucket, staged = self._stage_parts(decode, prefill, d_graphs, p_graphs)
        assert d_bucket is not None  # a mixed step has decode rows
        self._fork(main, preset)
        # Decode first: its replay is running while the prefill replay is queued.
        with torch.cuda.stream(preset.decode.stream):
            d_graphs.replay(d_bucket)
        with torch.cuda.stream(preset.prefill.stream):
            p_graphs.replay(staged.bucket)
        self._join(main, preset)
        # Sampling on the main stream (after both parts): its tensors are the main stream's.
        return self._sample_parts(batch, decode, prefill, d_graphs, d_bucket, p_graphs, staged)

    def _joined_handle(
        self,
        batch: Batch,
        d_tokens: torch.Tensor,
        d_logprobs: torch.Tensor,
        p_tokens: torch.Tensor | None,
        p_logprobs: torch.Tensor | None,
        input_logprobs: dict[int, list[float]],
    ) -> StepHandle:
        if p_tokens is not None and p_logprobs is not None:
            tokens = torch.cat([d_tokens, p_tokens])
            logprobs = torch.cat([d_logprobs.float(), p_logprobs.float()])
        else:
            tokens, logprobs = d_tokens, d_logprobs
        return self._results_handle(batch, tokens, logprobs, input_logprobs)

    def _fork(self, main: torch.cuda.Stream, preset: Preset) -> None:
        """Both partition streams start after the main stream's work so far. The event is
        torch's (primary context) recorded on the main stream: waiting on an event of another
        context is allowed."""
        start = torch.cuda.Event()
        start.record(main)
        preset.decode.stream.wait_event(start)
        preset.prefill.stream.wait_event(start)

    def _join(self, main: torch.cuda.Stream, preset: Preset) -> None:
        """The main stream waits for both partition streams (so the next step, whatever its
        split, starts after this one); events of the partitions' own green contexts."""
        for part in (preset.decode, preset.prefill):
            part.record_done()
            part.block(main)

    def _forward_sample(
        self, batch: Batch, graphs: DecodeGraphs | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[int, list[float]]]:
        """Forward + sampling + token-table write of one part, on the current stream (the body
        of `ModelRunner.launch` without the host copy). Returns device tokens and logprobs of
        the emitting items (None if none emits) and prompt logprobs by item index."""
        items = batch.items
        emitting = [i for i, it in enumerate(items) if it.emits_token]
        if batch.is_decode_only and graphs is not None and graphs.fits(len(items)):
            bs = len(items)
            positions = np.fromiter((it.start for it in items), np.int64, bs)
            logits = graphs.run(positions, batch.rows, batch.slots)
            emit_rows, emit_next = graphs.rows[:bs], graphs.positions[:bs] + 1
            input_logprobs: dict[int, list[float]] = {}
        else:
            logits, emit_rows, emit_next, input_logprobs = self._forward_eager(batch, emitting)
        if not emitting:
            return None, None, input_logprobs
        tokens, logprobs = self._sample(batch, emitting, logits, emit_rows, emit_next)
        return tokens, logprobs, input_logprobs

    # -- memory ---------------------------------------------------------------------------------
    def release(self, tags: list[str]) -> None:
        if set(tags) & set(MEMORY_TAGS):
            for graphs in [*self.preset_graphs.values(), *self.prefill_graphs.values()]:
                graphs.release()
        super().release(tags)

    def recapture_if_needed(self, force: bool = False) -> None:
        super().recapture_if_needed(force)
        if self.released & {"weights", "kv_cache", "cuda_graph"}:
            return
        for graphs in [*self.preset_graphs.values(), *self.prefill_graphs.values()]:
            if force or not graphs.captured:
                graphs.capture()

    def close(self) -> None:
        self._teardown()
        super().close()


def make_runner_factory(config: EngineConfig) -> Callable[..., SmShareRunner]:
    """What `Engine` builds its runner with when `config.sm_share` is on (same arguments as
    `ModelRunner`)."""

    def build(
        model: CausalLM,
        kv_cache: PagedKVCache,
        table: RequestTable,
        eos_ids: tuple[int, ...],
        cuda_graph_max_bs: int = 0,
        prefill_graph_tokens: int = 0,
    ) -> SmShareRunner:
        return SmShareRunner(
            model,
            kv_cache,
            table,
            eos_ids,
            cuda_graph_max_bs,
            prefill_graph_tokens,
            tpot_ms=config.sm_share_tpot_ms,
            max_prefill_tokens=config.max_prefill_tokens,
        )

    return build
