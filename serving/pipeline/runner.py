"""Stage 0 of a pipeline-parallel engine: `PipelineRunner` has `ModelRunner`'s contract
(`launch(batch) -> handle`, `release`, `resume`, `close`), so `EngineLoop` drives it unchanged.

A step's walk: `launch` advances any layer move (a step boundary: the move in flight switches
owner, the next one starts copying while this step runs), peeks the request
table's queued host writes and new rows' sampling parameters (the other stages keep mirrors),
builds a `StepPlan` (the batch cut into micro-batches) and broadcasts it; stage 0 embeds and runs
its layers micro-batch after micro-batch, sending each on while it starts the next; the last
stage samples and sends the tokens back; the per-stage timings feed the latency predictor, and
the rebalancer may queue a new partition for the next boundary. Worker stages are spawned
processes (`worker.py`); KV slot ids, the allocator, the radix cache and the table are stage 0's.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rollout_accel.serving.engine.batch import Batch, CompletedStep, StepHandle, StepResult
from rollout_accel.serving.engine.kv_pool import RequestTable, SlotAllocator
from rollout_accel.serving.engine.model_runner import MemoryReleasedError
from rollout_accel.serving.pipeline import comm
from rollout_accel.serving.pipeline.latency import LatencyPredictor
from rollout_accel.serving.pipeline.partition import (
    Bounds,
    counts_of,
    even_bounds,
    parse_partition,
    single_moves,
)
from rollout_accel.serving.pipeline.plan import StepPlan, build_plan
from rollout_accel.serving.pipeline.rebalance import Rebalancer
from rollout_accel.serving.pipeline.stage import StageExecutor, names_owned
from rollout_accel.serving.pipeline.stage_graphs import emulated
from rollout_accel.serving.pipeline.worker import WorkerSpec, send_weights, worker_main

if TYPE_CHECKING:
    from rollout_accel.serving.engine.engine import Engine

log = logging.getLogger(__name__)


def used_slots(allocator: SlotAllocator) -> np.ndarray:
    """Slots holding KV right now (everything not on the free list): what a moved layer copies."""
    used = np.ones(allocator.num_slots, dtype=bool)
    used[allocator._free[: allocator.num_free]] = False  # the free list's live part
    return np.flatnonzero(used).astype(np.int64)


class PipelineBrokenError(RuntimeError):
    """A stage failed mid-step; the pipeline cannot run further steps (restart the engine)."""


class PipelineRunner:
    """Drives `pp_size` stages from the engine thread (see module docstring)."""

    def __init__(
        self,
        executor: StageExecutor,
        table: RequestTable,
        allocator: SlotAllocator,
        ctrl: Any,
        data: Any,
        processes: list[Any],
        micro_batches: int,
        rebalance: bool,
    ) -> None:
        self.executor = executor
        self.model = executor.model
        self.table = table
        self.allocator = allocator
        self.ctrl, self.data = ctrl, data
        self.processes = processes
        self.pp_size = executor.pp_size
        self.micro_batches = micro_batches
        self.rebalance = rebalance
        num_layers = executor.model.config.num_hidden_layers
        self.predictor = LatencyPredictor(self.pp_size)
        self.rebalancer = Rebalancer(num_layers, self.pp_size)
        self.released: set[str] = set()
        self.steps = 0
        self.history: list[dict[str, Any]] = []
        self.timeline: list[dict[str, Any]] = [{"step": 0, "bounds": list(executor.bounds)}]
        self._target: Bounds | None = None
        self._moving: tuple[int, int, int, float, int] | None = None
        self._delta: list[np.ndarray] = []
        self._row_owner: dict[int, Any] = {}
        self._closed = False
        self.broken: BaseException | None = None
        self.record_features = False  # keep each step's micro-batch features (benchmarks)
        self.graph_stats: list[dict[str, Any] | None] = [executor.graph_stats()] + [None] * (
            self.pp_size - 1
        )

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def start(cls, engine: Engine) -> PipelineRunner:
        """Spawns the worker stages, joins the groups and strips stage 0 to its layers."""
        config = engine.config
        pp = config.pp_size
        num_layers = engine.model_config.num_hidden_layers
        bounds = (
            parse_partition(config.pp_partition, num_layers, pp)
            if config.pp_partition
            else even_bounds(num_layers, pp)
        )
        device = engine.device
        is_cuda = device.type == "cuda"
        if is_cuda:
            base = device.index if device.index is not None else torch.cuda.current_device()
            if torch.cuda.device_count() < base + pp:
                raise ValueError(
                    f"pp_size: {pp} stages need {pp} GPUs from cuda:{base}, "
                    f"{torch.cuda.device_count()} visible"
                )
        backend = "nccl" if is_cuda else "gloo"
        # Decode CUDA graphs per stage: opt-in (pp_cuda_graph) until measured on GPUs; off with
        # cuda_graph=False (--disable-cuda-graph) and on the CPU.
        graph_max_bs = 0
        if (is_cuda or emulated()) and config.pp_cuda_graph and config.cuda_graph:
            graph_max_bs = min(config.cuda_graph_max_bs, config.max_running_requests)
        ports = (comm.free_port(), comm.free_port())
        timeout_s = 600.0
        ctx = mp.get_context("spawn")
        processes = []
        for stage in range(1, pp):
            spec = WorkerSpec(
                stage=stage,
                bounds=bounds,
                ports=ports,
                backend=backend,
                timeout_s=timeout_s,
                config=engine.model_config,
                dtype=engine.dtype,
                rotary_dtype=engine.model.model.rotary.inv_freq.dtype,
                device=f"cuda:{base + stage}" if is_cuda else "cpu",
                num_slots=engine.kv_cache.num_slots,
                max_rows=engine.table.max_rows,
                max_context=engine.table.max_context,
                eos_ids=engine.eos_ids,
                threads=torch.get_num_threads(),
                graph_max_bs=graph_max_bs,
            )
            proc = ctx.Process(target=worker_main, args=(spec,), daemon=True)
            proc.start()
            processes.append(proc)
        ctrl, data = comm.join_groups(ports, 0, pp, backend, timeout_s)
        for stage in range(1, pp):
            send_weights(engine.model, stage, bounds, data)
        for stage in range(1, pp):
            reply = comm.recv_object(ctrl, stage)
            if "error" in reply:
                raise RuntimeError(f"pipeline stage failed to start: {reply['error']}")
        executor = StageExecutor(
            0,
            bounds,
            engine.model,
            engine.kv_cache,
            engine.table,
            engine.eos_ids,
            data,
            False,
            graph_max_bs=graph_max_bs,
        )
        micro = config.pp_microbatches or pp
        runner = cls(
            executor,
            engine.table,
            engine.allocator,
            ctrl,
            data,
            processes,
            micro,
            config.pp_rebalance,
        )
        if graph_max_bs:
            runner.capture_graphs()  # every bucket now, as pp = 1 does at start
        return runner

    def weight_updater(self, cache: Any, model_config: Any, set_version: Any) -> Any:
        from rollout_accel.serving.pipeline.weights import PipelineWeightUpdater

        return PipelineWeightUpdater(self, cache, model_config, set_version)

    @property
    def bounds(self) -> Bounds:
        return self.executor.bounds

    # -- launching ------------------------------------------------------------------------------
    @torch.inference_mode()
    def launch(self, batch: Batch) -> StepHandle:
        self._check_broken()
        if self.released & {"weights", "kv_cache"}:
            raise MemoryReleasedError(
                f"memory is released ({sorted(self.released)}); resume_memory_occupation first"
            )
        table = self.table
        # The other stages mirror the table: they get the host writes and new rows' sampling
        # parameters that `flush` is about to apply on this stage's device (flushed only once
        # the plan exists, so a refused batch leaves them queued for the next one).
        writes = [(r, s, v.copy()) for r, s, v in table._pending]
        params = [(r, f, i) for r, (f, i) in table._pending_params.items()]
        plan = build_plan(batch, self.micro_batches, writes, params)
        self._attach_sampling(batch, plan)
        table.flush()
        try:
            self._advance_moves()
            if self._moving is not None:
                self._delta.append(plan.slots)  # KV written while a layer is in flight
            # Graphs are captured only while the partition is settled (see StageGraphs).
            plan.capture_graphs = self._moving is None and self._target is None
            t_start = time.perf_counter()
            comm.broadcast_command(self.ctrl, {"kind": "step", "plan": plan})
            ids = torch.from_numpy(plan.input_ids).to(self.executor.device)
            nd = plan.num_decode
            if nd:
                rows = torch.from_numpy(plan.token_rows[:nd]).to(ids.device)
                pos = torch.from_numpy(plan.positions[:nd]).to(ids.device)
                ids[:nd] = table.token_ids[rows, pos]
            _, _, _, timings0 = self.executor.run_step(plan, ids)
            replies = [comm.recv_object(self.ctrl, s) for s in range(1, self.pp_size)]
            last = replies[-1]
            timings = [timings0] + [r["timings"] for r in replies]
            if self.executor.graphs is not None:
                self.graph_stats = [self.executor.graph_stats()] + [
                    r.get("graphs") for r in replies
                ]
        except Exception as exc:
            # The stages are out of step now (one may wait on a send that never comes): every
            # later call fails at once with the cause instead of hanging on the groups.
            self.broken = exc
            raise PipelineBrokenError(f"a pipeline stage failed mid-step: {exc!r}") from exc
        wall = time.perf_counter() - t_start
        tokens = np.asarray(last["tokens"], dtype=np.int64)
        if tokens.size:
            emit_rows = np.concatenate([mb.emit_rows for mb in plan.micro])
            emit_next = np.concatenate([mb.emit_next for mb in plan.micro])
            dev = table.token_ids.device
            table.token_ids[
                torch.from_numpy(emit_rows).to(dev), torch.from_numpy(emit_next).to(dev)
            ] = torch.from_numpy(tokens).to(dev)
        self._account(plan, timings, wall)
        result = StepResult(
            tokens.tolist(), np.asarray(last["logprobs"]).tolist(), last["input_logprobs"]
        )
        return CompletedStep(batch, result)

    def _check_broken(self) -> None:
        if self.broken is not None:
            raise PipelineBrokenError(f"the pipeline failed earlier: {self.broken!r}")

    def _attach_sampling(self, batch: Batch, plan: StepPlan) -> None:
        """New owners' sampling parameters (by row) and penalised rows' outputs for the sampler."""
        for it in batch.items:
            if not it.emits_token:
                continue
            req = it.request
            row = int(req.row)
            # Compared by identity while holding the request: ids of freed objects are reused.
            if self._row_owner.get(row) is not req:
                self._row_owner[row] = req
                plan.samplers[row] = req.params
            if req.params.has_penalties:
                plan.outputs[row] = list(req.output_ids)

    def _account(self, plan: StepPlan, timings: list[list[list[float]]], wall: float) -> None:
        self.steps += 1
        counts = counts_of(self.bounds)
        busy = []
        for stage, per_mb in enumerate(timings):
            for mb, (t_layers, t_extra) in zip(plan.micro, per_mb, strict=True):
                self.predictor.observe(stage, mb.features, counts[stage], t_layers, t_extra)
            busy.append(sum(a + b for a, b in per_mb))
        self.history.append(
            {
                "step": self.steps,
                "wall": wall,
                "busy": busy,
                "tokens": int(plan.positions.size),
                "batch": sum(mb.features.batch for mb in plan.micro),
                "emitted": sum(mb.features.emitting for mb in plan.micro),
                "context": sum(mb.features.context_tokens for mb in plan.micro),
                "bounds": list(self.bounds),
            }
        )
        if self.record_features:
            self.history[-1]["micro_features"] = [mb.features for mb in plan.micro]
        if len(self.history) > 100_000:
            del self.history[: len(self.history) // 2]
        if not self.rebalance:
            return
        self.rebalancer.observe(max(busy))
        # A stage's predicted time is linear in its layer count: predict the per-layer and extra
        # costs once per stage, not once per DP cell (the DP asks O(layers^2) times: for 36
        # layers that was ~5 ms of host time per step).
        pred, micro = self.predictor, plan.micro
        per_layer = [sum(pred.layer_cost(s, mb.features) for mb in micro) for s in range(len(busy))]
        extra = [sum(pred.extra_cost(s, mb.features) for mb in micro) for s in range(len(busy))]

        def stage_time(stage: int, layers: int) -> float:
            return layers * per_layer[stage] + extra[stage]

        target = self.rebalancer.propose(self.steps, self.bounds, stage_time)
        if target is not None:
            self._target = target

    # -- partition changes ----------------------------------------------------------------------
    def request_bounds(self, bounds: Bounds | list[int]) -> None:
        """Queues a partition (boundaries); layers move one per step boundary from the next."""
        bounds = tuple(int(b) for b in bounds)
        cur = self.bounds
        if len(bounds) != len(cur) or bounds[0] != 0 or bounds[-1] != cur[-1]:
            raise ValueError(f"bounds: expected {len(cur)} boundaries from 0 to {cur[-1]}")
        if any(bounds[i + 1] <= bounds[i] for i in range(len(bounds) - 1)):
            raise ValueError(f"bounds: every stage needs at least one layer, got {bounds}")
        self._target = bounds

    def _advance_moves(self) -> None:
        """At a step boundary: finish the layer move in flight (ownership switches now), then
        begin the next one toward the target partition (see `StageExecutor.begin_move`)."""
        if self._moving is not None:
            layer, src, dst, t_begin, copied = self._moving
            self._moving = None
            delta = np.unique(np.concatenate(self._delta)) if self._delta else np.zeros(0, np.int64)
            self._delta = []
            t0 = time.perf_counter()
            command = {"kind": "move_end", "layer": layer, "src": src, "dst": dst, "delta": delta}
            comm.broadcast_command(self.ctrl, command)
            self.executor.end_move(layer, src, dst, delta)
            now = time.perf_counter()
            self.timeline.append(
                {
                    "step": self.steps,
                    "bounds": list(self.bounds),
                    "layer": layer,
                    "from": src,
                    "to": dst,
                    "in_flight_s": now - t_begin,
                    "switch_s": now - t0,
                    "slots_copied": copied + int(delta.size),
                }
            )
            log.info(
                "pipeline: layer %d moved %d -> %d; partition %s", layer, src, dst, self.bounds
            )
        if self._target is None or self._target == self.bounds:
            self._target = None
            return
        layer, src, dst = single_moves(self.bounds, self._target)[0]
        used = used_slots(self.allocator)
        command = {"kind": "move_begin", "layer": layer, "src": src, "dst": dst, "used": used}
        comm.broadcast_command(self.ctrl, command)
        self.executor.begin_move(layer, src, dst, used)
        self._moving = (layer, src, dst, time.perf_counter(), int(used.size))

    def finish_moves(self) -> None:
        """Completes every queued move now (between steps: weights, memory, tests)."""
        while self._moving is not None or self._target is not None:
            self._advance_moves()

    # -- weights and memory ---------------------------------------------------------------------
    def load_weights(self, named: list[tuple[str, torch.Tensor]]) -> int:
        """Validated named tensors -> the stages owning them."""
        self._check_broken()
        self.finish_moves()  # a layer in flight would miss the update on its new stage
        ex = self.executor
        others = [
            (n, t.detach().to("cpu"))
            for n, t in named
            if any(names_owned(n, s, self.bounds, ex.tied) for s in range(1, self.pp_size))
        ]
        if others:
            comm.broadcast_command(self.ctrl, {"kind": "weights", "named": others})
        ex.load_weights(named)
        return len(named)

    def release(self, tags: list[str]) -> None:
        self._check_broken()
        self.finish_moves()
        comm.broadcast_command(self.ctrl, {"kind": "release", "tags": list(tags)})
        self.executor.release(tags)
        self.released |= set(tags)

    def resume(self, tags: list[str]) -> None:
        self._check_broken()
        comm.broadcast_command(self.ctrl, {"kind": "resume", "tags": list(tags)})
        self.executor.resume(tags)
        self.released -= set(tags)

    def recapture_if_needed(self, force: bool = False) -> None:
        """With `force` (SGLang's recapture_cuda_graph), every stage drops its decode graphs;
        they are captured again when a step needs them. Otherwise graphs are kept current
        lazily (see StageGraphs), so there is nothing to do."""
        if force and self.executor.graphs is not None:
            self._graphs_command({"action": "reset", "reason": "recapture requested"})

    def capture_graphs(self) -> None:
        """Every stage captures all its decode buckets now (start, benchmark warm-up)."""
        self.finish_moves()
        if self.executor.graphs is None:
            return
        self._graphs_command({"action": "capture"})
        replies = [comm.recv_object(self.ctrl, s) for s in range(1, self.pp_size)]
        self.graph_stats = [self.executor.graph_stats()] + [r["graphs"] for r in replies]

    def set_cuda_graphs(self, on: bool) -> None:
        """Switches the stages' decode graphs on or off (eager) at the next step; benchmarks
        compare both on one engine. A no-op when the engine was started without them."""
        self._graphs_command({"action": "enable", "on": bool(on)})

    @property
    def cuda_graphs(self) -> bool:
        graphs = self.executor.graphs
        return graphs is not None and graphs.enabled

    def _graphs_command(self, command: dict[str, Any]) -> None:
        self._check_broken()
        if self.executor.graphs is None:
            return
        comm.broadcast_command(self.ctrl, {"kind": "graphs", **command})
        self.executor.graphs_command(command)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            comm.broadcast_command(self.ctrl, {"kind": "stop"})
        except Exception:
            log.warning("could not tell the pipeline stages to stop", exc_info=True)
        for proc in self.processes:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
        comm.destroy(self.ctrl, self.data)
        self.released |= {"weights", "kv_cache", "cuda_graph"}

    # -- reporting ------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {
            "pp_size": self.pp_size,
            "bounds": list(self.bounds),
            "steps": self.steps,
            "micro_batches": self.micro_batches,
            "predictor": self.predictor.report(),
            "timeline": list(self.timeline),
            "cuda_graphs": list(self.graph_stats),
        }
