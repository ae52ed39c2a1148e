"""Pipeline-parallel engine on the CPU (gloo): 2 and 3 stages of tiny presets give the same tokens
as pp = 1 for greedy and seeded sampling, before, during and after layer moves with requests in
flight; abort, weight updates by HF name and release/resume work across stages."""

from __future__ import annotations

import threading

import pytest
import torch

from rollout_accel.serving.engine import Engine

ENGINE_ARGS = dict(max_total_tokens=2048, max_running_requests=16)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18], [40, 41]]


def _params(n: int) -> list[dict]:
    base = [
        {"temperature": 0},
        {"temperature": 0.9, "top_p": 0.8, "sampling_seed": 3},
        {"temperature": 1.0, "sampling_seed": 11},
        {"temperature": 0.7, "top_k": 20, "sampling_seed": 5},
    ]
    return [{**base[i % 4], "max_new_tokens": n, "ignore_eos": True} for i in range(len(PROMPTS))]


def _ids(outs: list[dict]) -> list[list[int]]:
    return [o["output_ids"] for o in outs]


@pytest.fixture(scope="module")
def reference() -> dict[str, list[list[int]]]:
    with Engine("tiny-qwen3", **ENGINE_ARGS) as eng:
        short = _ids(eng.generate(input_ids=PROMPTS, sampling_params=_params(10)))
        long = _ids(eng.generate(input_ids=PROMPTS, sampling_params=_params(48)))
        weights = [(n, p.detach().clone()) for n, p in eng.model.named_parameters()]
        named = [(n, t * 0.5) for n, t in weights if "layers.3.mlp.down_proj" in n or "norm" in n]
        eng.update_weights_from_tensor(named)
        updated = _ids(eng.generate(input_ids=PROMPTS, sampling_params=_params(10)))
    return {"short": short, "long": long, "updated": updated, "named": named}


@pytest.fixture(scope="module", params=[2, 3], ids=["pp2", "pp3"])
def pp_engine(request: pytest.FixtureRequest) -> Engine:
    eng = Engine("tiny-qwen3", pp_size=request.param, **ENGINE_ARGS)
    yield eng
    eng.shutdown()


def _request_bounds(eng: Engine, bounds: tuple[int, ...]) -> None:
    eng.loop.call(lambda: eng.runner.request_bounds(bounds))


def test_tokens_match_pp1(pp_engine: Engine, reference: dict) -> None:
    assert pp_engine.runner.pp_size == pp_engine.config.pp_size
    assert (
        _ids(pp_engine.generate(input_ids=PROMPTS, sampling_params=_params(10)))
        == reference["short"]
    )


def test_rebalance_with_requests_in_flight(pp_engine: Engine, reference: dict) -> None:
    """Moves layers back and forth while 48-token generations run; tokens stay identical."""
    runner = pp_engine.runner
    pp = runner.pp_size
    plans = [(0, 1, 4), (0, 3, 4)] if pp == 2 else [(0, 2, 3, 4), (0, 1, 2, 4)]
    result: dict = {}
    thread = threading.Thread(
        target=lambda: result.update(
            out=pp_engine.generate(input_ids=PROMPTS, sampling_params=_params(48))
        )
    )
    steps0 = runner.steps
    thread.start()
    for bounds in plans:
        target = steps0 + (8 if bounds is plans[0] else 24)
        while runner.steps < target and thread.is_alive():
            thread.join(0.01)
        _request_bounds(pp_engine, bounds)
    thread.join(120)
    assert _ids(result["out"]) == reference["long"]
    moved = [t for t in runner.timeline if "layer" in t]
    # Layers moved one per step boundary while the generations were running.
    assert len(moved) >= 3 and all(steps0 < t["step"] < runner.steps for t in moved)
    assert all(t["slots_copied"] > 0 for t in moved)
    pp_engine.loop.call(runner.finish_moves)
    assert tuple(runner.bounds) == plans[-1]
    # After the moves: a fresh batch still matches.
    assert (
        _ids(pp_engine.generate(input_ids=PROMPTS, sampling_params=_params(10)))
        == reference["short"]
    )


def test_automatic_rebalancing_keeps_tokens(pp_engine: Engine, reference: dict) -> None:
    """The predictor + rebalancer loop on (eager thresholds so it acts on noisy CPU timings)."""
    from rollout_accel.serving.pipeline.rebalance import Rebalancer

    runner = pp_engine.runner

    def enable() -> None:
        runner.rebalancer = Rebalancer(4, runner.pp_size, threshold=0.0, interval=3, window=2)
        runner.rebalance = True

    pp_engine.loop.call(enable)
    try:
        out = pp_engine.generate(input_ids=PROMPTS, sampling_params=_params(48))
    finally:
        pp_engine.loop.call(lambda: setattr(runner, "rebalance", False))
        pp_engine.loop.call(runner.finish_moves)
    assert _ids(out) == reference["long"]
    report = runner.predictor.report()
    assert min(report["scored"]) > 0
    assert all(err == err for err in report["mean_rel_error"])  # measured, not NaN


def test_weight_update_follows_layer_owner(pp_engine: Engine, reference: dict) -> None:
    runner = pp_engine.runner
    original = [(n, p.detach().clone()) for n, p in _full_weights(pp_engine)]
    ok, message = pp_engine.update_weights_from_tensor([("model.layers.0.nope", torch.zeros(1))])
    assert not ok and "model.layers.0.nope" in message
    ok, message = pp_engine.update_weights_from_tensor(reference["named"])
    assert ok, message
    out = _ids(pp_engine.generate(input_ids=PROMPTS, sampling_params=_params(10)))
    assert out == reference["updated"]
    assert runner.bounds[-2] <= 3  # layer 3 (updated) lives on the last stage, not stage 0
    restore = [(n, t) for n, t in original if any(n == m for m, _ in reference["named"])]
    assert pp_engine.update_weights_from_tensor(restore)[0]
    assert (
        _ids(pp_engine.generate(input_ids=PROMPTS, sampling_params=_params(10)))
        == reference["short"]
    )


def _full_weights(eng: Engine) -> list[tuple[str, torch.Tensor]]:
    """The full model's weights as a pp = 1 engine would hold them (same preset and seed)."""
    from rollout_accel.serving.models.loader import load_model

    return list(
        load_model("tiny-qwen3", device="cpu", seed=eng.config.seed).model.named_parameters()
    )


def test_abort_and_release_resume(pp_engine: Engine, reference: dict) -> None:
    result: dict = {}
    thread = threading.Thread(
        target=lambda: result.update(
            out=pp_engine.generate(
                input_ids=[1, 2, 3],
                sampling_params={"max_new_tokens": 400, "ignore_eos": True},
                rid="long-one",
            )
        )
    )
    thread.start()
    while pp_engine.runner.steps < 3:
        thread.join(0.01)
    assert pp_engine.abort("long-one") == 1
    thread.join(60)
    assert result["out"]["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(result["out"]["output_ids"]) < 400
    ok, message = pp_engine.release_memory_occupation()
    assert ok, message
    assert pp_engine.memory_released
    ok, _ = pp_engine.update_weights_from_tensor(reference["named"])
    assert not ok  # weights are released
    ok, message = pp_engine.resume_memory_occupation()
    assert ok, message
    assert (
        _ids(pp_engine.generate(input_ids=PROMPTS, sampling_params=_params(10)))
        == reference["short"]
    )


def test_bad_pipeline_arguments() -> None:
    with pytest.raises(ValueError, match="pp_size"):
        Engine("tiny-qwen3", pp_size=0, **ENGINE_ARGS)
    with pytest.raises(ValueError, match="pp_partition"):
        Engine("tiny-qwen3", pp_size=2, pp_partition="3,3", **ENGINE_ARGS)
    with pytest.raises(ValueError, match="pp_size"):
        Engine("tiny-qwen3", pp_size=5, **ENGINE_ARGS)


def test_dead_stage_fails_requests_fast_instead_of_hanging() -> None:
    eng = Engine("tiny-qwen3", pp_size=2, **ENGINE_ARGS)
    try:
        worker = eng.runner.processes[0]
        worker.kill()
        worker.join(10)
        out: dict = {}

        def run() -> None:
            try:
                eng.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 4})
            except Exception as exc:  # the caller gets an error, not silence
                out["error"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        thread.join(60)
        assert not thread.is_alive(), "a request hung on a dead pipeline stage"
        assert "pipeline" in str(out["error"])
    finally:
        eng.shutdown(timeout=20)


def test_update_weights_from_disk_under_pp(pp_engine: Engine, reference: dict, tmp_path) -> None:
    from rollout_accel.serving.models.loader import load_model, save_model_dir

    loaded = load_model("tiny-qwen3", device="cpu", seed=pp_engine.config.seed)
    path = save_model_dir(loaded, tmp_path / "same")
    ok, message = pp_engine.update_weights_from_disk(str(path))
    assert ok, message
    assert (
        _ids(pp_engine.generate(input_ids=PROMPTS, sampling_params=_params(10)))
        == reference["short"]
    )
    ok, message = pp_engine.update_weights_from_disk(str(tmp_path / "missing"))
    assert not ok and "model_path" in message
