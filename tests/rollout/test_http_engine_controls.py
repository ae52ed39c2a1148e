"""HttpEngine's per-request abort, KV capacity and draft support against a real loopback server."""

from __future__ import annotations

import asyncio

from rollout_accel.rollout.pool import HttpEngine
from rollout_accel.serving.server import ServerThread


def test_abort_request_kv_capacity_and_drafting() -> None:
    plain = ServerThread(model_path="tiny-qwen3", max_total_tokens=4096).start()
    spec = ServerThread(model_path="tiny-qwen3", speculative_algorithm="NGRAM").start()
    try:

        async def run() -> tuple:
            engine = HttpEngine(plain.url)
            drafting = HttpEngine(spec.url)
            try:
                payload = {
                    "input_ids": [5, 6, 7],
                    "rid": "cut-me",
                    "sampling_params": {"max_new_tokens": 5000, "ignore_eos": True},
                }
                task = asyncio.create_task(engine.generate(payload))
                await asyncio.sleep(0.3)
                await engine.abort_request("cut-me")
                out = await asyncio.wait_for(task, timeout=30)
                await engine.abort_request("no-such-rid")  # finished or unknown: no error
                capacity = await engine.kv_capacity()
                return (
                    out,
                    capacity,
                    await engine.drafting(),
                    await drafting.drafting(),
                    (
                        engine.supports_drafts(),
                        drafting.supports_drafts(),
                    ),
                )
            finally:
                await engine.close()
                await drafting.close()

        out, capacity, plain_drafts, spec_drafts, supports = asyncio.run(run())
    finally:
        plain.stop()
        spec.stop()
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert 0 < out["meta_info"]["completion_tokens"] < 5000
    assert capacity == 4096
    assert (plain_drafts, spec_drafts) == (False, True)
    assert supports == (False, True)
