"""Schedule policies on the real engine (tiny-qwen3, in-process): ordering changes latency, never
tokens; the per-request scheduling fields are validated; the serve flag offers every policy."""

from __future__ import annotations

import threading

import pytest
import torch

from rollout_accel.rollout.cli import build_parser
from rollout_accel.serving.engine import Engine, InvalidRequestError
from rollout_accel.serving.engine.schedule_policy import POLICIES


def _workload() -> tuple[list[list[int]], list[dict], list[int | None], list[float | None]]:
    """Shared prefixes (so cache-aware policies reorder and defer), mixed lengths, seeded
    sampling at temperature 1 (any change in batching or order that leaked into sampling would
    show), two priorities and per-request deadlines."""
    gen = torch.Generator().manual_seed(7)
    shared = torch.randint(4, 500, (96,), generator=gen).tolist()
    prompts: list[list[int]] = []
    for i in range(12):
        tail = torch.randint(
            4, 500, (int(torch.randint(3, 200, (1,), generator=gen)),), generator=gen
        )
        prompts.append((shared if i % 3 else []) + tail.tolist())
    params = [
        {"temperature": 1.0, "max_new_tokens": 12 + i % 5, "sampling_seed": 100 + i}
        for i in range(len(prompts))
    ]
    priorities = [(-1 if i % 4 == 3 else 0) for i in range(len(prompts))]
    slos = [(50.0 if i % 5 == 0 else None) for i in range(len(prompts))]
    return prompts, params, priorities, slos


def _run(policy: str) -> list[list[int]]:
    prompts, params, priorities, slos = _workload()
    # A small prefill budget makes admission span several steps, so the order matters.
    with Engine("tiny-qwen3", schedule_policy=policy, max_prefill_tokens=128) as engine:
        outs: list[dict | None] = [None] * len(prompts)

        def one(i: int) -> None:
            outs[i] = engine.generate(
                input_ids=prompts[i],
                sampling_params=params[i],
                priority=priorities[i],
                ttft_slo_ms=slos[i],
            )

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return [out["output_ids"] for out in outs]  # type: ignore[index]


def test_identical_outputs_whichever_policy_ran() -> None:
    reference = _run("fcfs")
    assert all(len(ids) >= 12 for ids in reference)
    for policy in ("lpm", "hrrn", "slo"):
        assert _run(policy) == reference, policy


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"priority": "high"}, "priority"),
        ({"priority": True}, "priority"),
        ({"ttft_slo_ms": -5}, "ttft_slo_ms"),
        ({"ttft_slo_ms": "fast"}, "ttft_slo_ms"),
        ({"ttft_slo_ms": float("nan")}, "ttft_slo_ms"),
    ],
)
def test_bad_scheduling_fields_are_refused(engine: Engine, kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError, match=field):
        engine.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 1}, **kwargs)
    out = engine.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 1})
    assert out["meta_info"]["completion_tokens"] == 1


def test_serve_flag_offers_every_policy() -> None:
    parser = build_parser()
    action = next(
        a
        for sub in parser._subparsers._group_actions  # type: ignore[union-attr]
        for name, p in sub.choices.items()
        if name == "serve"
        for a in p._actions
        if "--schedule-policy" in a.option_strings
    )
    assert set(action.choices) == set(POLICIES)
    with pytest.raises(ValueError, match="ttft_slo_ms"):
        Engine("tiny-qwen3", ttft_slo_ms=0)


def test_server_takes_priority_and_ttft_slo_ms(engine: Engine) -> None:
    import httpx

    from rollout_accel.serving.server import ServerThread

    server = ServerThread(engine).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            bad = http.post("/generate", json={"input_ids": [1, 2], "ttft_slo_ms": -1})
            assert bad.status_code == 400 and "ttft_slo_ms" in bad.text
            ok = http.post(
                "/generate",
                json={
                    "input_ids": [1, 2],
                    "sampling_params": {"max_new_tokens": 2},
                    "priority": -1,
                    "ttft_slo_ms": 250,
                },
            )
            assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] == 2
    finally:
        server.stop()
