"""The HTTP engine pool survives a frozen engine and re-admits a restarted one (issue 20: 9).
Real `rollout serve` processes on loopback, real SIGSTOP / SIGCONT / SIGKILL."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from rollout_accel.rollout.pool import EnginePool, HttpEngine
from tests.serving.serve_process import ServeProcess

PAYLOAD = {"sampling_params": {"max_new_tokens": 64, "ignore_eos": True}}
LONG_TOKENS = 300
LONG = {"sampling_params": {"max_new_tokens": LONG_TOKENS, "ignore_eos": True}}


def _handle(url: str) -> HttpEngine:
    return HttpEngine(url, probe_interval_s=0.3, probe_timeout_s=1.0, max_backoff_s=1.0)


@pytest.fixture(scope="module")
def servers():
    procs = [ServeProcess(), ServeProcess()]
    try:
        yield [p.wait_ready() for p in procs]
    finally:
        for p in procs:
            p.stop()


async def _batch(pool: EnginePool, count: int, offset: int = 0) -> list[dict]:
    return await asyncio.gather(
        *(pool.generate({**PAYLOAD, "input_ids": [offset + i + 1, 2, 3]}) for i in range(count))
    )


async def _until(predicate, timeout: float) -> float:
    start = time.perf_counter()
    while not predicate():
        assert time.perf_counter() - start < timeout, "condition not reached in time"
        await asyncio.sleep(0.05)
    return time.perf_counter() - start


def test_sigstopped_engine_is_dropped_and_its_requests_redispatched(servers) -> None:
    frozen, other = servers

    async def run() -> tuple[list[dict], float, EnginePool]:
        pool = EnginePool([_handle(frozen.url), _handle(other.url)], readmit_wait_s=5)
        try:
            await _batch(pool, 4)  # both engines warm, probes running
            # Long enough that half of them are still generating on `frozen` when it stops (on
            # an idle machine 64 tokens each could all finish before the signal).
            tasks = asyncio.gather(
                *(pool.generate({**LONG, "input_ids": [i + 9, 2]}) for i in range(16))
            )
            await asyncio.sleep(0.2)
            frozen.signal(signal.SIGSTOP)
            start = time.perf_counter()
            outs = await asyncio.wait_for(tasks, timeout=45)
            took = time.perf_counter() - start
            assert not pool.engines[0].healthy and frozen.url in pool.stats.failed_engines
            # Thawed, it answers probes again and is re-admitted.
            frozen.signal(signal.SIGCONT)
            await _until(lambda: pool.engines[0] in pool.healthy, timeout=15)
            assert frozen.url in pool.stats.readmitted_engines
            return outs, took, pool
        finally:
            frozen.signal(signal.SIGCONT)
            await pool.close()

    outs, took, pool = asyncio.run(run())
    assert len(outs) == 16
    assert all(o["meta_info"]["finish_reason"]["type"] == "length" for o in outs)
    assert all(o["meta_info"]["completion_tokens"] == LONG_TOKENS for o in outs)
    assert pool.stats.redispatched >= 1
    assert took < 30


def test_killed_engine_restarted_on_the_same_port_is_used_again(servers) -> None:
    alive, victim = servers

    async def run() -> EnginePool:
        pool = EnginePool([_handle(alive.url), _handle(victim.url)], readmit_wait_s=5)
        try:
            await _batch(pool, 4)
            victim.signal(signal.SIGKILL)
            victim.proc.wait(10)
            outs = await _batch(pool, 8, offset=20)  # all served by the live engine
            assert all(o["meta_info"]["finish_reason"]["type"] == "length" for o in outs)
            assert not pool.engines[1].healthy
            restarted = ServeProcess(victim.port)
            servers[1] = restarted
            await asyncio.to_thread(restarted.wait_ready)
            await _until(lambda: pool.engines[1] in pool.healthy, timeout=15)
            before = pool.engines[1].completed
            await _batch(pool, 8, offset=40)
            assert pool.engines[1].completed > before  # back in rotation
            return pool
        finally:
            await pool.close()

    pool = asyncio.run(run())
    assert victim.url in pool.stats.readmitted_engines
