"""The real sglang-router in front of several of our servers, driven the way slime drives it:
workers register with POST /workers, /generate goes through the router, our controller's router
expansion lists the workers, and abort + /v1/loads work per worker."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from rollout_accel.rollout.pool.http import expand_router
from rollout_accel.serving.server import ServerThread
from tests.serving.router_process import sglang_router, wait_for_workers


@pytest.fixture(scope="module")
def workers():
    servers = [ServerThread(model_path="tiny-qwen3").start() for _ in range(2)]
    yield servers
    for srv in servers:
        srv.stop()


def test_router_in_front_of_rollout_serve_workers(workers, tmp_path) -> None:
    with sglang_router(tmp_path / "router.log") as router:
        for srv in workers:
            # slime's SGLangEngine._register_to_router payload
            reply = httpx.post(
                f"{router}/workers", json={"url": srv.url, "worker_type": "regular"}, timeout=30
            )
            assert reply.status_code in (200, 202), reply.text
        listed = wait_for_workers(router, 2)
        assert {w["url"] for w in listed} == {srv.url for srv in workers}
        # The router read our /server_info / model info when it registered them.
        assert all(w["model_id"] == "tiny-qwen3" for w in listed)
        assert sorted(asyncio.run(expand_router(router))) == sorted(s.url for s in workers)

        # /generate through the router reaches every worker (round robin).
        before = [s.engine.get_loads()["num_cached_tokens"] for s in workers]
        for i in range(4):
            out = httpx.post(
                f"{router}/generate",
                json={
                    "input_ids": [1 + i, 2, 3],
                    "sampling_params": {"max_new_tokens": 4, "temperature": 0},
                    "return_logprob": True,
                },
                timeout=60,
            ).json()
            assert out["meta_info"]["completion_tokens"] == 4
            assert len(out["meta_info"]["output_token_logprobs"]) == 4
        after = [s.engine.get_loads()["num_cached_tokens"] for s in workers]
        assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)

        # Abort per worker, as slime's rollout does: long requests through the router, then
        # abort_all on each worker until /v1/loads says it is idle.
        results: list[dict] = []

        def long_request(i: int) -> None:
            results.append(
                httpx.post(
                    f"{router}/generate",
                    json={
                        "input_ids": [7, 8, 9 + i],
                        "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True},
                    },
                    timeout=120,
                ).json()
            )

        threads = [threading.Thread(target=long_request, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.time() + 60
        while sum(s.engine.get_loads()["num_running_reqs"] for s in workers) < 4:
            assert time.time() < deadline
            time.sleep(0.05)
        for srv in workers:
            while True:
                assert httpx.post(f"{srv.url}/abort_request", json={"abort_all": True}).is_success
                load = httpx.get(f"{srv.url}/v1/loads").json()["loads"][0]
                if load["num_running_reqs"] == 0 and load["num_waiting_reqs"] == 0:
                    break
                time.sleep(0.05)
        for t in threads:
            t.join(timeout=60)
        assert len(results) == 4
        assert all(r["meta_info"]["finish_reason"]["type"] == "abort" for r in results)
        assert all(r["meta_info"]["completion_tokens"] < 4000 for r in results)

        # slime's SGLangEngine.shutdown: find the worker id by URL, DELETE it.
        gone = workers[0].url
        worker_id = next(w["id"] for w in listed if w["url"] == gone)
        assert httpx.delete(f"{router}/workers/{worker_id}", timeout=30).is_success
        deadline = time.time() + 30
        while gone in asyncio.run(expand_router(router)):
            assert time.time() < deadline
            time.sleep(0.1)
        assert asyncio.run(expand_router(router)) == [workers[1].url]
