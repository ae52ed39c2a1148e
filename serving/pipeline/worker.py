"""A worker stage (1..pp_size-1): a spawned process that loads the model, keeps its layer range,
and executes stage 0's commands (steps, layer moves, weights, memory) until told to stop."""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass

import numpy as np
import torch

from rollout_accel.serving.engine.kv_pool import RequestTable
from rollout_accel.serving.models.loader import load_model
from rollout_accel.serving.models.paged_kv import PagedKVCache
from rollout_accel.serving.pipeline import comm
from rollout_accel.serving.pipeline.partition import Bounds
from rollout_accel.serving.pipeline.stage import StageExecutor

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    stage: int
    bounds: Bounds
    ports: tuple[int, int]
    backend: str
    timeout_s: float
    model_path: str
    dtype: str
    seed: int
    device: str
    num_slots: int
    max_rows: int
    max_context: int
    eos_ids: tuple[int, ...]
    threads: int


def _build(spec: WorkerSpec, data_group) -> StageExecutor:
    device = torch.device(spec.device)
    loaded = load_model(spec.model_path, dtype=spec.dtype, device=device, seed=spec.seed)
    model, cfg = loaded.model, loaded.config
    dtype = next(model.parameters()).dtype
    # Only this stage's layers get KV memory; the executor strips the rest of the model.
    kv = PagedKVCache(0, spec.num_slots, cfg.num_key_value_heads, cfg.head_dim, dtype, device)
    shape = (spec.num_slots, cfg.num_key_value_heads, cfg.head_dim)
    start, end = spec.bounds[spec.stage], spec.bounds[spec.stage + 1]
    for i in range(cfg.num_hidden_layers):
        owned = start <= i < end
        kv.k.append(torch.zeros(shape if owned else 0, dtype=dtype, device=device))
        kv.v.append(torch.zeros(shape if owned else 0, dtype=dtype, device=device))
    table = RequestTable(spec.max_rows, spec.max_context, device)
    executor = StageExecutor(
        spec.stage, spec.bounds, model, kv, table, spec.eos_ids, data_group, mirror_table=True
    )
    if device.type == "cuda":
        for i in range(start, end):
            executor._fuse(model.model.layers[i])
    return executor


def worker_main(spec: WorkerSpec) -> None:
    """Process entry point (spawned by stage 0)."""
    torch.set_num_threads(spec.threads)
    if spec.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(spec.device))
    world = len(spec.bounds) - 1
    ctrl, data = comm.join_groups(spec.ports, spec.stage, world, spec.backend, spec.timeout_s)
    try:
        executor = _build(spec, data)
    except Exception as exc:
        comm.send_object(ctrl, {"error": f"stage {spec.stage}: {exc!r}"}, 0)
        raise
    comm.send_object(ctrl, {"ready": spec.stage}, 0)
    try:
        _serve(executor, ctrl)
    except Exception:
        log.error("pipeline stage %d failed:\n%s", spec.stage, traceback.format_exc())
        raise
    finally:
        comm.destroy(ctrl, data)


def _serve(executor: StageExecutor, ctrl) -> None:
    while True:
        command = comm.broadcast_command(ctrl)
        kind = command["kind"]
        if kind == "stop":
            return
        if kind == "step":
            tokens, logprobs, input_lps, timings = executor.run_step(command["plan"])
            reply: dict = {"timings": timings}
            if executor.is_last:
                reply["tokens"] = torch.cat(tokens).cpu().numpy() if tokens else np.zeros(0)
                reply["logprobs"] = (
                    torch.cat(logprobs).float().cpu().numpy() if logprobs else np.zeros(0)
                )
                reply["input_logprobs"] = input_lps
            comm.send_object(ctrl, reply, 0)
        elif kind == "move_begin":
            executor.begin_move(command["layer"], command["src"], command["dst"], command["used"])
        elif kind == "move_end":
            executor.end_move(command["layer"], command["src"], command["dst"], command["delta"])
        elif kind == "weights":
            executor.load_weights(command["named"])
        elif kind == "release":
            executor.release(command["tags"])
        elif kind == "resume":
            executor.resume(command["tags"])
        else:
            raise ValueError(f"unknown pipeline command {kind!r}")
