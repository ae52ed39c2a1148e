"""The client streams, and a timeout aborts the request by rid instead of resending it
(issue 20: 8). Real server on loopback."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from rollout_accel.serving.client import EngineClient, RequestTimeoutError, ServerError
from rollout_accel.serving.server import ServerThread


@pytest.fixture(scope="module")
def server():
    with ServerThread(model_path="tiny-qwen3", max_running_requests=32) as srv:
        yield srv


def _live(url: str) -> int:
    loads = httpx.get(f"{url}/v1/loads").json()["loads"][0]
    return loads["num_running_reqs"] + loads["num_waiting_reqs"]


def test_stream_generate_yields_chunks_then_stops(server) -> None:
    async def run() -> list[dict]:
        async with EngineClient(server.url) as client:
            return [
                chunk
                async for chunk in client.stream_generate(
                    {"input_ids": [3, 4, 5], "sampling_params": {"max_new_tokens": 6}}
                )
            ]

    chunks = asyncio.run(run())
    assert len(chunks) >= 2
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert len(chunks[-1]["output_ids"]) == 6


def test_stream_generate_reports_a_bad_request(server) -> None:
    async def run() -> None:
        async with EngineClient(server.url) as client:
            async for _ in client.stream_generate({"input_ids": [3], "priority": "x"}):
                pass

    with pytest.raises(ServerError, match="priority"):
        asyncio.run(run())


def test_timeout_aborts_by_rid_and_never_resends(server) -> None:
    """timeout=1 on a long generation: one RequestTimeoutError, the server stops the request,
    and the rid is free again (a resend would have left it running or refused it)."""

    async def run() -> tuple[float, dict]:
        async with EngineClient(server.url, timeout=1.0, retries=3) as client:
            start = time.perf_counter()
            with pytest.raises(RequestTimeoutError):
                await client.generate(
                    {
                        "input_ids": [5, 6],
                        "rid": "slow-one",
                        "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True},
                    }
                )
            took = time.perf_counter() - start
            deadline = time.perf_counter() + 10
            while _live(server.url) and time.perf_counter() < deadline:
                await asyncio.sleep(0.05)
            again = await client.generate(
                {"input_ids": [5, 6], "rid": "slow-one", "sampling_params": {"max_new_tokens": 2}}
            )
            return took, again

    took, again = asyncio.run(run())
    assert took < 4.0  # one attempt, not four
    assert _live(server.url) == 0
    assert again["meta_info"]["finish_reason"]["type"] == "length"


def test_timeout_without_rid_gets_one_and_aborts_it(server) -> None:
    async def run() -> None:
        async with EngineClient(server.url, timeout=0.8) as client:
            with pytest.raises(RequestTimeoutError):
                await client.generate(
                    {
                        "input_ids": [[5, 6], [7, 8]],
                        "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True},
                    }
                )

    asyncio.run(run())
    deadline = time.perf_counter() + 10
    while _live(server.url) and time.perf_counter() < deadline:
        time.sleep(0.05)
    assert _live(server.url) == 0
