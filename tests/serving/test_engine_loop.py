"""The step pipeline: overlap vs synchronous, failure isolation, engine death, memory release."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
import torch

from rollout_accel.serving.engine import Engine, EngineDeadError, InvalidRequestError
from rollout_accel.serving.engine.batch import Batch
from rollout_accel.serving.models.loader import load_model


def _prompts(count: int = 8, seed: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lens = [1, 4, 9, 17, 30, 6, 12, 23, 2, 40][:count]
    return [torch.randint(3, 500, (n,), generator=gen).tolist() for n in lens]


def _mixed_params(count: int) -> list[dict]:
    """Requests that finish at different steps: lengths, stop tokens, penalties, min tokens."""
    params = []
    for i in range(count):
        p = {
            "temperature": 0.9,
            "max_new_tokens": 5 + 7 * i,
            "sampling_seed": 100 + i,
            "stop_token_ids": [7, 300],
        }
        if i % 3 == 1:
            p["frequency_penalty"] = 0.5
        if i % 4 == 2:
            p["min_new_tokens"] = 4
        params.append(p)
    return params


def _settled_loads(engine: Engine) -> dict:
    loads = engine.get_loads()
    assert loads["num_running_reqs"] == 0 and loads["num_waiting_reqs"] == 0
    return loads


def test_overlap_equals_synchronous_and_frees_every_slot() -> None:
    prompts, params = _prompts(), _mixed_params(8)
    results = []
    for overlap in (False, True):
        with Engine("tiny-qwen3", overlap_schedule=overlap, max_prefill_tokens=16) as eng:
            assert eng.loop.overlap is overlap
            outs = eng.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
            results.append(
                [(o["output_ids"], o["meta_info"]["finish_reason"], o["text"]) for o in outs]
            )
            loads = _settled_loads(eng)
            # Every slot computed ahead for a finished request went to the cache or back.
            assert loads["num_used_tokens"] == loads["num_cached_tokens"]
            assert eng.flush_cache()
            assert eng.get_loads()["num_used_tokens"] == 0
    assert results[0] == results[1]


def test_streamed_text_is_incremental_and_matches_final() -> None:
    with Engine("tiny-qwen3") as eng:
        chunks = list(
            eng.generate(
                input_ids=[5, 6, 7],
                sampling_params={"temperature": 0, "max_new_tokens": 24, "ignore_eos": True},
                stream=True,
            )
        )
    texts = [c["text"] for c in chunks]
    assert len(chunks) == 24
    for before, after in itertools.pairwise(texts):
        assert after.startswith(before)
    assert texts[-1] == chunks[-1]["text"]


class _PoisonLaunch:
    """Makes every launch whose batch holds a request with `rid` raise (a step that fails)."""

    def __init__(self, engine: Engine, rid: str, message: str = "injected step failure") -> None:
        self.launch = engine.runner.launch
        self.rid = rid
        self.message = message
        self.calls = 0

    def __call__(self, batch: Batch):
        self.calls += 1
        if any(item.request.rid == self.rid for item in batch.items):
            raise RuntimeError(self.message)
        return self.launch(batch)


@pytest.mark.parametrize("overlap", [False, True])
def test_failing_request_is_isolated_and_bystanders_are_unhurt(overlap: bool) -> None:
    prompts, params = (
        _prompts(),
        [{"temperature": 0.7, "max_new_tokens": 20, "sampling_seed": i} for i in range(8)],
    )
    with Engine("tiny-qwen3", overlap_schedule=overlap) as eng:
        clean = eng.generate(input_ids=prompts, sampling_params=params)
        assert eng.flush_cache()
        eng.runner.launch = _PoisonLaunch(eng, "poison")
        results: dict[str, object] = {}

        def bystanders() -> None:
            results["outs"] = eng.generate(input_ids=prompts, sampling_params=params)

        worker = threading.Thread(target=bystanders)
        worker.start()
        time.sleep(0.05)  # the bystanders are mid-generation when the poison arrives
        with pytest.raises(InvalidRequestError, match="injected step failure"):
            eng.generate(input_ids=[9, 9, 9], sampling_params={"max_new_tokens": 30}, rid="poison")
        worker.join(timeout=60)
        outs = results["outs"]
        assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in clean]
        assert all(o["meta_info"]["finish_reason"]["type"] == "length" for o in outs)
        assert eng.scheduler.stats.isolated_failures == 1
        assert eng.alive
        loads = _settled_loads(eng)
        assert loads["num_used_tokens"] == loads["num_cached_tokens"]
        assert eng.flush_cache() and eng.get_loads()["num_used_tokens"] == 0
        # The engine keeps serving.
        again = eng.generate(input_ids=prompts[0], sampling_params=params[0])
        assert again["output_ids"] == clean[0]["output_ids"]


def test_fatal_step_error_fails_every_caller_fast() -> None:
    eng = Engine("tiny-qwen3")
    eng.runner.launch = _PoisonLaunch(eng, "fatal", "CUDA error: an illegal memory access")
    errors: list[BaseException] = []
    finished_at: list[float] = []

    def caller() -> None:
        try:
            eng.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 10_000})
        except BaseException as exc:
            errors.append(exc)
        finished_at.append(time.perf_counter())

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    start = time.perf_counter()
    with pytest.raises(EngineDeadError, match="CUDA error"):
        eng.generate(input_ids=[4, 5], sampling_params={"max_new_tokens": 4}, rid="fatal")
    for t in threads:
        t.join(timeout=5)
    assert len(errors) == 4 and all(isinstance(e, EngineDeadError) for e in errors)
    assert max(finished_at) - start < 1.0
    assert not eng.alive
    with pytest.raises(EngineDeadError):
        eng.generate(input_ids=[1], sampling_params={"max_new_tokens": 1})
    with pytest.raises(EngineDeadError):
        eng.get_loads()
    eng.shutdown()


def test_release_resume_keeps_outputs_and_weight_update_between_changes_them() -> None:
    prompts = _prompts(4)
    greedy = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
    with Engine("tiny-qwen3") as eng:
        before = [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=greedy)]
        ok, message = eng.release_memory_occupation(["weights", "kv_cache", "cuda_graph"])
        assert ok, message
        assert eng.memory_released
        # A request sent while memory is released waits, then runs after resume.
        pending: dict[str, object] = {}
        worker = threading.Thread(
            target=lambda: pending.setdefault(
                "out", eng.generate(input_ids=prompts[0], sampling_params=greedy)
            )
        )
        worker.start()
        time.sleep(0.2)
        assert "out" not in pending
        ok, message = eng.resume_memory_occupation(["weights", "kv_cache", "cuda_graph"])
        assert ok, message
        worker.join(timeout=30)
        assert pending["out"]["output_ids"] == before[0]
        after = [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=greedy)]
        assert after == before
        # Release, push other weights while released (refused), resume, push, generate.
        assert eng.release_memory_occupation()[0]
        other = load_model("tiny-qwen3", dtype="float32", seed=123).model
        named = list(other.state_dict().items())
        assert not eng.update_weights_from_tensor(named)[0]
        assert eng.resume_memory_occupation()[0]
        ok, message = eng.update_weights_from_tensor(named, weight_version="v2")
        assert ok, message
        changed = eng.generate(input_ids=prompts, sampling_params=greedy)
        assert all(o["meta_info"]["weight_version"] == "v2" for o in changed)
    with Engine("tiny-qwen3", seed=123) as fresh:
        expected = fresh.generate(input_ids=prompts, sampling_params=greedy)
    assert [o["output_ids"] for o in changed] == [o["output_ids"] for o in expected]
    assert [o["output_ids"] for o in changed] != before


@pytest.mark.parametrize("overlap", [False, True])
def test_transient_failure_runs_suspects_alone_then_resumes(overlap: bool) -> None:
    """A step that fails once (not because of any request): its requests run alone, pass, and
    every output equals an undisturbed run."""
    prompts = _prompts()
    params = [{"temperature": 0.8, "max_new_tokens": 12, "sampling_seed": i} for i in range(8)]
    with Engine("tiny-qwen3", overlap_schedule=overlap, max_prefill_tokens=32) as eng:
        clean = eng.generate(input_ids=prompts, sampling_params=params)
        assert eng.flush_cache()
        launch = eng.runner.launch
        calls = {"n": 0, "failed": 0}

        def flaky(batch: Batch):
            calls["n"] += 1
            # Fail a prefill step, then (once the suspects passed alone) a later batched step.
            late = calls["failed"] == 1 and len(batch.items) > 1 and not eng.scheduler.suspects
            if calls["n"] == 2 or late:
                calls["failed"] += 1
                raise RuntimeError("transient")
            return launch(batch)

        eng.runner.launch = flaky
        outs = eng.generate(input_ids=prompts, sampling_params=params)
        assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in clean]
        assert calls["failed"] == 2
        assert eng.scheduler.stats.isolated_failures == 0
        assert not eng.scheduler.suspects
        loads = _settled_loads(eng)
        assert loads["num_used_tokens"] == loads["num_cached_tokens"]
        assert not any(r for r in eng.scheduler.waiting)
