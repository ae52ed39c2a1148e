"""`/health_generate` tells the truth, clients that hang up are aborted, and a weight-group
rendezvous with a dead master times out without stopping generation (issue 20: 3, 5, 6).
Real server on loopback."""

from __future__ import annotations

import asyncio
import threading
import time

import aiohttp
import httpx
import pytest

from rollout_accel.serving.server import ServerThread, free_port
from rollout_accel.serving.server.settings import ServerSettings

LONG = {"max_new_tokens": 3000, "ignore_eos": True}


@pytest.fixture(scope="module")
def server():
    settings = ServerSettings(health_generate_timeout_s=2.0, weight_group_timeout_s=2.0)
    with ServerThread(model_path="tiny-qwen3", max_running_requests=64, settings=settings) as srv:
        yield srv


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def _running(http: httpx.Client) -> int:
    loads = http.get("/v1/loads").json()["loads"][0]
    return loads["num_running_reqs"] + loads["num_waiting_reqs"]


def _wait_idle(http: httpx.Client, timeout: float = 20.0) -> float:
    start = time.perf_counter()
    while _running(http):
        assert time.perf_counter() - start < timeout, f"{_running(http)} requests still live"
        time.sleep(0.05)
    return time.perf_counter() - start


def test_health_generate_is_503_when_wedged_released_and_200_again(http) -> None:
    assert http.get("/health_generate").status_code == 200
    # Wedged: generation makes no progress (here: paused in place). False within the timeout.
    assert http.post("/pause_generation", json={"mode": "in_place"}).status_code == 200
    start = time.perf_counter()
    r = http.get("/health_generate")
    assert r.status_code == 503 and time.perf_counter() - start < 5.0
    assert http.get("/health").status_code == 200  # liveness is a different question
    assert http.post("/continue_generation", json={}).status_code == 200
    assert http.get("/health_generate").status_code == 200
    # Weights released: the probe cannot generate.
    assert http.post("/release_memory_occupation", json={"tags": ["weights"]}).status_code == 200
    r = http.get("/health_generate")
    assert r.status_code == 503, r.text
    assert http.post("/resume_memory_occupation", json={"tags": ["weights"]}).status_code == 200
    assert http.get("/health_generate").status_code == 200
    _wait_idle(http)


def test_health_generate_under_load_is_200(server, http) -> None:
    async def load() -> list[int]:
        async with aiohttp.ClientSession() as s:

            async def one(i: int) -> int:
                async with s.post(
                    f"{server.url}/generate",
                    json={"input_ids": [i + 1, 7], "sampling_params": {"max_new_tokens": 64}},
                ) as r:
                    await r.read()
                    return r.status

            tasks = [asyncio.create_task(one(i)) for i in range(48)]
            await asyncio.sleep(0.3)
            async with s.get(f"{server.url}/health_generate") as r:
                health = r.status
            return [health, *await asyncio.gather(*tasks)]

    statuses = asyncio.run(load())
    assert statuses[0] == 200 and all(s == 200 for s in statuses[1:])


def test_client_hangups_abort_their_requests(server, http) -> None:
    """64 clients that give up after 0.5 s (32 plain, 32 streaming): nothing keeps generating,
    and their KV is returned (compared with before: this test does not own the pool)."""
    before = http.get("/v1/loads").json()["loads"][0]

    async def hang_up() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as s:

            async def one(i: int, stream: bool) -> None:
                body = {"input_ids": [i + 3, 9], "sampling_params": LONG, "stream": stream}
                try:
                    async with s.post(f"{server.url}/generate", json=body) as r:
                        async for _ in r.content:
                            pass
                except TimeoutError:
                    pass

            await asyncio.gather(*(one(i, stream=i % 2 == 1) for i in range(64)))

    asyncio.run(hang_up())
    assert _wait_idle(http, timeout=10.0) < 10.0
    loads = http.get("/v1/loads").json()["loads"][0]
    held = loads["num_used_tokens"] - loads["num_cached_tokens"]
    assert held == before["num_used_tokens"] - before["num_cached_tokens"]


def test_dead_master_times_out_without_blocking_generation(server, http) -> None:
    port = free_port()  # nothing listens there
    result: dict = {}

    def join() -> None:
        start = time.perf_counter()
        with httpx.Client(base_url=server.url, timeout=60) as c:
            r = c.post(
                "/init_weights_update_group",
                json={
                    "master_address": "127.0.0.1",
                    "master_port": port,
                    "rank_offset": 1,
                    "world_size": 2,
                    "group_name": "dead",
                    "backend": "gloo",
                },
            )
        result.update(status=r.status_code, body=r.json(), took=time.perf_counter() - start)

    thread = threading.Thread(target=join)
    thread.start()
    time.sleep(0.3)
    # Generation goes on while the rendezvous waits.
    start = time.perf_counter()
    r = http.post(
        "/generate", json={"input_ids": [4, 5, 6], "sampling_params": {"max_new_tokens": 8}}
    )
    assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 8
    assert time.perf_counter() - start < 1.5
    assert http.get("/server_info").status_code == 200
    thread.join(60)
    assert result["status"] == 400
    assert "within 2 s" in result["body"]["message"]
    assert result["took"] < 20
    # The failed name is free again.
    assert (
        http.post("/destroy_weights_update_group", json={"group_name": "dead"}).status_code == 400
    )
