"""Start-up profiling for the planner: a few timed runs per configuration (GPU only).

Per configuration (the whole GPU, and each preset's partitions): decode graph replays at three
batch sizes x two context lengths, and single-sequence prefill-chunk graph replays at three
chunk sizes (on the main stream for the whole GPU, on a preset's prefill partition); plus the
host cost of one
fork + join (events between the main stream and a preset's streams). As in served steps, a
partition stream only replays graphs: inputs are staged on the main stream and the timing events
bracket the fork and join on the main stream. Runs before the engine serves anything: decode
rows use free table rows (restored after) and write K/V only to the reserved slot 0; prefill
writes K/V into free slots, which are overwritten before any request reads them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from rollout_accel.serving.engine.cuda_graphs import DecodeGraphs
from rollout_accel.serving.engine.prefill_graphs import PrefillGraphs
from rollout_accel.serving.smshare.partitions import Partition, PartitionSet
from rollout_accel.serving.smshare.planner import WHOLE, LatencyTable

if TYPE_CHECKING:
    from rollout_accel.serving.smshare.concurrent_step import SmShareRunner

REPS = 3


def _timed(
    main: torch.cuda.Stream, part: Partition | None, fn: Callable[[], object], reps: int = REPS
) -> float:
    """Mean seconds of `fn` (graph replays only when `part` is given) on `part`'s stream, or on
    the main stream; one warm-up run first."""

    def once() -> None:
        if part is None:
            fn()
            return
        start = torch.cuda.Event()
        start.record(main)
        part.stream.wait_event(start)
        with torch.cuda.stream(part.stream):
            fn()
        part.record_done()
        part.block(main)

    once()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record(main)
    for _ in range(reps):
        once()
    end.record(main)
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def decode_points(max_bs: int, max_context: int) -> list[tuple[int, int]]:
    """(batch, context per row) pairs to time."""
    batches = sorted({max(1, max_bs // 8), max(1, max_bs // 2), max_bs})
    contexts = sorted({min(256, max_context - 2), max(2, min(2048, max_context - 2))})
    return [(b, c) for b in batches for c in contexts]


def prefill_points(max_prefill_tokens: int, max_context: int, num_slots: int) -> list[int]:
    cap = max(16, min(max_prefill_tokens, max_context - 2, num_slots - 2))
    return sorted({min(256, cap), max(16, cap // 2), cap})


@torch.inference_mode()
def profile_latency(runner: SmShareRunner, max_prefill_tokens: int) -> LatencyTable:
    """Times every configuration of `runner` (its presets and the whole GPU)."""
    partitions = runner.partitions
    assert partitions is not None and runner.graphs is not None
    device = runner.device
    table = runner.table
    main = torch.cuda.current_stream(device)
    result = LatencyTable()
    num_slots = runner.kv_cache.num_slots
    max_context = table.max_context
    d_points = [
        (b, c) for b, c in decode_points(runner.graphs.max_bs, max_context) if b <= table.max_rows
    ]
    p_points = prefill_points(max_prefill_tokens, max_context, num_slots)
    result.names[WHOLE] = "whole"
    result.decode[WHOLE] = [
        (b, b * c, _time_decode(runner, runner.graphs, main, None, b, c)) for b, c in d_points
    ]
    whole = runner.chunk_graphs
    assert whole is not None
    # A graph computes its whole bucket: time each point's bucket, full.
    buckets = sorted({next(b for b in whole.buckets if b >= n) for n in p_points})
    buckets = [b for b in buckets if b < min(max_context, num_slots)]
    result.prefill[WHOLE] = [
        (b, _time_prefill_graph(runner, whole, main, None, b)) for b in buckets
    ]
    for preset in partitions.presets:
        result.names[preset.index] = preset.name
        graphs = runner.preset_graphs[preset.index]
        result.decode[preset.index] = [
            (b, b * c, _time_decode(runner, graphs, main, preset.decode, b, c)) for b, c in d_points
        ]
        prefill = runner.prefill_graphs[preset.index]
        result.prefill[preset.index] = [
            (b, _time_prefill_graph(runner, prefill, main, preset.prefill, b)) for b in buckets
        ]
    torch.cuda.synchronize(device)
    result.switch_overhead_s = _join_cost(runner, partitions)
    return result


def _time_decode(
    runner: SmShareRunner,
    graphs: DecodeGraphs,
    main: torch.cuda.Stream,
    part: Partition | None,
    bs: int,
    ctx: int,
) -> float:
    table = runner.table
    device = runner.device
    num_slots = runner.kv_cache.num_slots
    rows = np.arange(bs, dtype=np.int64)
    # Distinct slots per row and position, so attention reads as much KV as a real batch would.
    spread = torch.arange(bs * ctx, device=device, dtype=torch.int64) % (num_slots - 1) + 1
    table.req_to_token[:bs, :ctx] = spread.view(bs, ctx).to(torch.int32)
    positions = np.full(bs, ctx - 1, dtype=np.int64)
    slots = torch.zeros(bs, dtype=torch.int64)  # K/V of the profiled token -> reserved slot 0
    bucket = graphs.stage(positions, rows, slots)  # on the main stream
    seconds = _timed(main, part, lambda: graphs.replay(bucket))
    torch.cuda.synchronize(device)
    table.req_to_token[:bs].zero_()  # back to the host mirror's state (rows are free)
    torch.cuda.synchronize(device)
    return seconds


def _time_prefill_graph(
    runner: SmShareRunner,
    graphs: PrefillGraphs,
    main: torch.cuda.Stream,
    part: Partition | None,
    n: int,
) -> float:
    """One sequence of `n` tokens on the table's spare row (restored after); on `part`'s
    stream, or on the main stream (the whole GPU)."""
    table = runner.table
    num_slots = runner.kv_cache.num_slots
    positions = np.arange(n, dtype=np.int64)
    bucket = graphs.stage_arrays(
        np.zeros(n, dtype=np.int64),
        positions,
        np.full(n, table.pad_row, dtype=np.int64),
        positions % (num_slots - 1) + 1,
        np.array([0, n], dtype=np.int64),
        np.array([n], dtype=np.int64),
        np.array([table.pad_row], dtype=np.int64),
        np.array([n - 1], dtype=np.int64),
        np.zeros(1, dtype=np.int64),
        np.zeros(1, dtype=np.int64),
    )
    seconds = _timed(main, part, lambda: graphs.replay(bucket))
    torch.cuda.synchronize(runner.device)
    table.req_to_token[table.pad_row].zero_()
    torch.cuda.synchronize(runner.device)
    return seconds


def _join_cost(runner: SmShareRunner, partitions: PartitionSet, joins: int = 200) -> float:
    """Host seconds one fork + join adds (events both ways), measured on the first preset."""
    preset = partitions.presets[0]
    main = torch.cuda.current_stream(runner.device)
    torch.cuda.synchronize(runner.device)
    began = time.perf_counter()
    for _ in range(joins):
        runner._fork(main, preset)
        runner._join(main, preset)
    torch.cuda.synchronize(runner.device)
    return (time.perf_counter() - began) / joins


def synthetic_table(partitions: PartitionSet, max_bs: int, max_prefill_tokens: int) -> LatencyTable:
    """A table without timing (profile=False): times scale with 1/SMs from nominal costs. For
    tests and quick starts only; the planner's choices are then rough."""
    total = partitions.total_sms
    result = LatencyTable(names={WHOLE: "whole"})

    def fill(cfg: int, decode_sms: int, prefill_sms: int) -> None:
        # Decode is bandwidth-bound (weak in SMs), prefill compute-bound (linear in SMs).
        dec_scale = (total / decode_sms) ** 0.35
        pre_scale = total / prefill_sms
        result.decode[cfg] = [
            (b, b * c, dec_scale * (2e-3 + 5e-6 * b + 2e-9 * b * c))
            for b in (1, max(2, max_bs // 2), max(3, max_bs))
            for c in (256, 2048)
        ]
        result.prefill[cfg] = [
            (n, pre_scale * (3e-4 + 2e-6 * n)) for n in (256, max(512, max_prefill_tokens))
        ]

    fill(WHOLE, total, total)
    for preset in partitions.presets:
        result.names[preset.index] = preset.name
        fill(preset.index, preset.decode.sms, preset.prefill.sms)
    result.switch_overhead_s = 2e-5
    return result
