"""A worker stage (1..pp_size-1): a spawned process that builds the model's skeleton, receives the
weights of its layer range from stage 0 (so every stage serves the same weights, fast: nothing is
initialised or read from disk twice), and executes stage 0's commands (steps, layer moves,
weights, memory) until told to stop."""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from rollout_accel.serving.engine.kv_pool import RequestTable
from rollout_accel.serving.models.config import ModelConfig
from rollout_accel.serving.models.decoder import CausalLM
from rollout_accel.serving.models.paged_kv import PagedKVCache
from rollout_accel.serving.pipeline import comm
from rollout_accel.serving.pipeline.partition import Bounds
from rollout_accel.serving.pipeline.stage import StageExecutor, names_owned

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    stage: int
    bounds: Bounds
    ports: tuple[int, int]
    backend: str
    timeout_s: float
    config: ModelConfig
    dtype: torch.dtype
    rotary_dtype: torch.dtype
    device: str
    num_slots: int
    max_rows: int
    max_context: int
    eos_ids: tuple[int, ...]
    threads: int
    graph_max_bs: int = 0  # decode CUDA graphs up to this micro-batch size (0: eager)


def skeleton(
    config: ModelConfig, dtype: torch.dtype, device: torch.device, owns
) -> tuple[CausalLM, dict[str, tuple[int, ...]]]:
    """The model with memory only for the parameters `owns(name)` accepts (uninitialised; the
    weights arrive from stage 0), and every parameter's full shape."""
    with torch.device("meta"):
        model = CausalLM(config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    fresh: dict[int, torch.nn.Parameter] = {}
    for prefix, module in model.named_modules():
        for key, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in fresh:  # a tied parameter stays one object
                name = f"{prefix}.{key}" if prefix else key
                shape = tuple(param.shape) if owns(name) else (0,)
                fresh[id(param)] = torch.nn.Parameter(
                    torch.empty(shape, dtype=dtype, device=device)
                )
            module._parameters[key] = fresh[id(param)]
    return model.eval(), shapes


def send_weights(model: CausalLM, stage: int, bounds: Bounds, group) -> None:
    """Stage 0: the parameters `stage` owns, in named order, then the rotary frequencies."""
    tied = model.config.tie_word_embeddings
    for name, param in model.named_parameters():
        if names_owned(name, stage, bounds, tied):
            dist.send(param.data.contiguous(), stage, group=group)
    dist.send(model.model.rotary.inv_freq.contiguous(), stage, group=group)


def _build(spec: WorkerSpec, data_group) -> StageExecutor:
    device = torch.device(spec.device)
    cfg, dtype = spec.config, spec.dtype
    tied = cfg.tie_word_embeddings

    def owns(name: str) -> bool:
        return names_owned(name, spec.stage, spec.bounds, tied)

    model, shapes = skeleton(cfg, dtype, device, owns)
    for name, param in model.named_parameters():
        if owns(name):
            dist.recv(param.data, 0, group=data_group)
    inv_freq = torch.empty(cfg.head_dim // 2, dtype=spec.rotary_dtype, device=device)
    dist.recv(inv_freq, 0, group=data_group)
    model.model.rotary.inv_freq = inv_freq
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
        spec.stage,
        spec.bounds,
        model,
        kv,
        table,
        spec.eos_ids,
        data_group,
        mirror_table=True,
        shapes=shapes,
        graph_max_bs=spec.graph_max_bs,
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
            reply: dict = {"timings": timings, "graphs": executor.graph_stats()}
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
        elif kind == "graphs":
            executor.graphs_command(command)
            if command["action"] == "capture":  # stage 0 waits: captures end before it goes on
                comm.send_object(ctrl, {"graphs": executor.graph_stats()}, 0)
        else:
            raise ValueError(f"unknown pipeline command {kind!r}")
