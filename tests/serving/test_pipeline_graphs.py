"""Per-stage decode CUDA graphs, host side (CPU): bucket choice, the padding layout, which
micro-batches may replay, and the recapture triggers on a real pp = 2 engine (a layer move, memory
release, a forced recapture, replaced tensors, reallocated rotary tables drop the graphs; an
in-place weight update keeps them; no capture while layer moves are queued or in flight).

Capturing needs CUDA: where a test needs "captured" graphs on the CPU it marks buckets captured
(the recorded addresses are real); the captures themselves run in test_pipeline_gpu.py."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from rollout_accel.serving.engine import Engine
from rollout_accel.serving.engine.config import EngineConfig
from rollout_accel.serving.pipeline.latency import StepFeatures
from rollout_accel.serving.pipeline.plan import MicroBatch
from rollout_accel.serving.pipeline.stage_graphs import (
    StageGraphs,
    graphable,
    padded_inputs,
    pick_bucket,
)

ENGINE_ARGS = dict(max_total_tokens=2048, max_running_requests=16)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18], [40, 41]]
GREEDY = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}


def _micro(n: int, prefill: int = 0, emitting: int | None = None, lp: bool = False) -> MicroBatch:
    emitting = n if emitting is None else emitting
    counts = np.array([1] * (n - (1 if prefill else 0)) + ([prefill] if prefill else []))
    cu = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    rows = np.arange(n, dtype=np.int64)
    return MicroBatch(
        item_lo=0,
        item_hi=n,
        tok_lo=0,
        tok_hi=int(cu[-1]),
        rows=rows,
        ends=np.full(n, 10, np.int64),
        cu=cu,
        num_decode=n - (1 if prefill else 0),
        max_q_len=int(counts.max()),
        logit_rows=np.arange(emitting, dtype=np.int64),
        emit_rows=rows[:emitting],
        emit_next=np.full(emitting, 10, np.int64),
        out_pos=np.zeros(emitting, np.int64),
        features=StepFeatures(n, 10 * n, prefill, emitting, 0, 0),
        lp_plan=[] if lp else None,
    )


def test_bucket_choice() -> None:
    buckets = [1, 2, 4, 8, 12, 16]
    assert [pick_bucket(buckets, n) for n in (1, 3, 4, 9, 16)] == [1, 4, 4, 12, 16]
    assert pick_bucket(buckets, 17) is None  # too many rows: eager
    assert pick_bucket(buckets, 0) is None


def test_padding_layout() -> None:
    block = padded_inputs(
        np.array([5, 9, 2]),
        np.array([3, 0, 7]),
        np.array([41, 42, 43]),
        np.array([6, 10, 3]),
        8,
        99,
    )
    assert block.shape == (4, 8) and block.dtype == np.int64
    assert block[:, :3].tolist() == [[5, 9, 2], [3, 0, 7], [41, 42, 43], [6, 10, 3]]
    # Padding rows: position 0 of the spare row, K/V into reserved slot 0, attending to nothing.
    assert (block[0, 3:] == 0).all() and (block[1, 3:] == 99).all()
    assert (block[2, 3:] == 0).all() and (block[3, 3:] == 0).all()
    out = np.full((4, 16), -1, np.int64)
    padded_inputs(np.array([1]), np.array([2]), np.array([3]), np.array([2]), 4, 99, out)
    assert out[:, :4].tolist() == [[1, 0, 0, 0], [2, 99, 99, 99], [3, 0, 0, 0], [2, 0, 0, 0]]
    assert (out[:, 4:] == -1).all()  # beyond the bucket: untouched (the graph never reads it)
    with pytest.raises(ValueError, match="bucket"):
        padded_inputs(np.arange(5), np.arange(5), np.arange(5), np.arange(5), 4, 99)


def test_only_pure_decode_micro_batches_replay() -> None:
    assert graphable(_micro(4))
    assert not graphable(_micro(4, prefill=7))  # mixed: eager
    assert not graphable(_micro(4, emitting=3))  # a row that emits nothing: eager
    assert not graphable(_micro(4, lp=True))  # prompt logprobs: eager


def test_config_flag() -> None:
    assert EngineConfig().pp_cuda_graph is False  # opt-in until measured on GPUs
    with pytest.raises(ValueError, match="pp_cuda_graph"):
        EngineConfig.from_kwargs(pp_cuda_graph="yes")


@pytest.fixture(scope="module")
def expected() -> list[list[int]]:
    with Engine("tiny-qwen3", **ENGINE_ARGS) as eng:
        return [o["output_ids"] for o in eng.generate(input_ids=PROMPTS, sampling_params=GREEDY)]


@pytest.fixture(scope="module")
def engine() -> Engine:
    eng = Engine("tiny-qwen3", pp_size=2, pp_cuda_graph=True, **ENGINE_ARGS)
    yield eng
    eng.shutdown()


def _ids(eng: Engine) -> list[list[int]]:
    return [o["output_ids"] for o in eng.generate(input_ids=PROMPTS, sampling_params=GREEDY)]


def _attach(eng: Engine) -> StageGraphs:
    """Host-side graphs on stage 0 (the CPU never captures: every micro-batch stays eager)."""
    ex = eng.runner.executor
    ex.graphs = StageGraphs(ex, 8)
    return ex.graphs


def _mark_captured(graphs: StageGraphs, *buckets: int) -> None:
    for bucket in buckets:
        graphs.layers[bucket] = object()
    graphs._fingerprint = graphs.fingerprint()
    graphs._rotary_generation = graphs.ex.model.model.rotary.generation


def test_flag_is_a_no_op_on_the_cpu(engine: Engine, expected: list[list[int]]) -> None:
    assert engine.config.pp_cuda_graph and engine.runner.executor.graphs is None
    assert not engine.runner.cuda_graphs
    assert _ids(engine) == expected


def test_capture_policy_and_bucket_per_micro_batch(engine: Engine) -> None:
    graphs = _attach(engine)
    try:
        captured: list[int] = []
        graphs.is_cuda = True  # pretend, to exercise the policy; capture itself is replaced
        graphs.capture = lambda bucket: (captured.append(bucket), graphs.layers.update({bucket: 1}))
        micro = [_micro(3), _micro(4, prefill=5), _micro(9)]
        assert graphs.prepare(micro, may_capture=False) == [None, None, None]
        # 3 rows had a bucket but no graph (counted); 9 rows exceed max_bs 8 (no bucket at all).
        assert captured == [] and graphs.eager_decode == 1
        assert graphs.prepare(micro, may_capture=True) == [4, None, None]
        assert captured == [4]
        graphs._fingerprint = graphs.fingerprint()
        graphs._rotary_generation = graphs.ex.model.model.rotary.generation
        assert graphs.prepare([_micro(2), _micro(4)], may_capture=False) == [None, 4]
        graphs.enabled = False  # the runtime switch: eager, nothing captured
        assert graphs.prepare([_micro(1)], may_capture=True) == [None] and captured == [4]
    finally:
        engine.runner.executor.graphs = None


def test_recapture_triggers(engine: Engine) -> None:
    runner = engine.runner
    graphs = _attach(engine)
    call = engine.loop.call
    try:
        _mark_captured(graphs, 4, 8)
        assert graphs.stale_reason() is None
        # An in-place weight update keeps every address: the graphs stay.
        layer0 = [(n, p.detach().clone()) for n, p in engine.model.named_parameters()]
        named = [(n, t) for n, t in layer0 if n.startswith("model.layers.0.")]
        assert engine.update_weights_from_tensor(named)[0]
        assert graphs.stale_reason() is None and graphs.captured
        # A layer move off stage 0 drops them at the switch.
        start = tuple(runner.bounds)
        call(lambda: runner.request_bounds((0, 1, 4)))
        call(runner.finish_moves)
        assert not graphs.captured and "moved" in graphs.invalidations[-1]
        # Memory release drops them before the buffers go.
        _mark_captured(graphs, 4)
        assert engine.release_memory_occupation()[0]
        assert not graphs.captured and "released" in graphs.invalidations[-1]
        assert engine.resume_memory_occupation()[0]
        # SGLang's recapture_cuda_graph.
        _mark_captured(graphs, 4)
        call(lambda: runner.recapture_if_needed(force=True))
        assert not graphs.captured and "recapture" in graphs.invalidations[-1]
        # Safety net: a tensor replaced behind our back, or reallocated rotary tables.
        _mark_captured(graphs, 4)
        param = engine.model.model.layers[0].mlp.down_proj.weight
        param.data = param.data.clone()
        assert graphs.stale_reason() == "addresses changed"
        graphs.prepare([_micro(4)], may_capture=False)
        assert not graphs.captured and graphs.invalidations[-1] == "addresses changed"
        _mark_captured(graphs, 4)
        graphs.ex.model.model.rotary.generation += 1
        assert graphs.stale_reason() == "rotary tables reallocated"
        call(lambda: runner.request_bounds(start))
        call(runner.finish_moves)
    finally:
        runner.executor.graphs = None


def test_no_capture_while_layers_move(engine: Engine, expected: list[list[int]]) -> None:
    runner = engine.runner
    graphs = _attach(engine)
    seen: list[tuple[int, bool]] = []
    prepare = graphs.prepare

    def recording(micro, may_capture):
        seen.append((runner.steps, may_capture))
        return prepare(micro, may_capture)

    graphs.prepare = recording
    try:
        engine.loop.call(lambda: runner.request_bounds((0, 1, 4)))
        engine.loop.call(runner.finish_moves)
        out: dict = {}
        thread = threading.Thread(target=lambda: out.update(ids=_ids(engine)))
        steps0 = runner.steps
        thread.start()
        while runner.steps < steps0 + 4 and thread.is_alive():
            thread.join(0.005)
        engine.loop.call(lambda: runner.request_bounds((0, 3, 4)))  # two moves in a row
        thread.join(120)
        assert out["ids"] == expected  # eager throughout on the CPU
        blocked = [step for step, may in seen if not may]
        # Blocked while the two moves were queued or in flight (one per boundary), then allowed.
        assert len(blocked) == 2 and seen[-1][1]
        assert sum("layer" in t for t in runner.timeline) >= 2
        engine.loop.call(lambda: runner.request_bounds((0, 2, 4)))
        engine.loop.call(runner.finish_moves)
    finally:
        runner.executor.graphs = None


def _counts(runner) -> list[tuple[int, int, int]]:
    return [(s["replays"], s["captures"], s["invalidations"]) for s in runner.graph_stats]


def test_graphed_path_end_to_end_emulated(monkeypatch, expected: list[list[int]]) -> None:
    """The graphed decode path on both stages with CPU stand-ins for capture and replay (see
    EMULATE_ENV): static inputs, receives into them, output views, head + sampler, captures at
    start, drops on moves / release and captures again. Micro-batches of 4 and 2 rows fill their
    buckets exactly (the CPU reference attention gives NaN for padding rows)."""
    from rollout_accel.serving.pipeline.stage_graphs import EMULATE_ENV

    monkeypatch.setenv(EMULATE_ENV, "1")  # spawned stages inherit it
    with Engine(
        "tiny-qwen3", pp_size=2, pp_microbatches=1, pp_cuda_graph=True, **ENGINE_ARGS
    ) as eng:
        runner = eng.runner
        assert runner.cuda_graphs and runner.executor.graphs.captured  # captured at start
        assert _ids(eng) == expected
        first = _counts(runner)
        assert all(c[0] >= 20 for c in first), first  # both stages replayed the decode steps
        out: dict = {}
        thread = threading.Thread(target=lambda: out.update(ids=_ids(eng)))
        thread.start()
        for bounds, wait in (((0, 1, 4), 3), ((0, 3, 4), 6)):
            steps = runner.steps
            while runner.steps < steps + wait and thread.is_alive():
                thread.join(0.005)
            eng.loop.call(lambda b=bounds: runner.request_bounds(b))
        thread.join(120)
        assert out["ids"] == expected
        moved = _counts(runner)
        assert all(m[2] > f[2] and m[1] > f[1] for m, f in zip(moved, first, strict=True))
        assert tuple(runner.bounds) == (0, 3, 4)
        eng.loop.call(lambda: setattr(runner, "micro_batches", 2))
        eng.loop.call(lambda: runner.set_cuda_graphs(False))
        eager = _ids(eng)
        eng.loop.call(lambda: runner.set_cuda_graphs(True))
        before = _counts(runner)
        assert _ids(eng) == eager == expected
        assert all(a[0] > b[0] for a, b in zip(_counts(runner), before, strict=True))
        assert eng.release_memory_occupation()[0] and eng.resume_memory_occupation()[0]
        released = _counts(runner)
        assert _ids(eng) == expected
        again = _counts(runner)
        assert all(a[1] > r[1] and a[0] > r[0] for a, r in zip(again, released, strict=True))


def test_failed_capture_falls_back_to_eager(engine: Engine) -> None:
    graphs = _attach(engine)
    try:
        graphs.is_cuda = True  # pretend, to reach the capture; the capture itself fails

        def broken(bucket: int) -> None:
            raise RuntimeError("capture refused")

        graphs.capture = broken
        assert graphs.prepare([_micro(4), _micro(2)], may_capture=True) == [None, None]
        assert not graphs.enabled and "capture refused" in graphs.stats()["failed"]
        engine.runner.executor.graphs_command({"action": "enable", "on": True})
        assert not graphs.enabled  # stays eager
    finally:
        engine.runner.executor.graphs = None
