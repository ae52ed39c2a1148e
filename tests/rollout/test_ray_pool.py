"""A Ray pool of two engine actors on the CPU: a step completes, and survives ray.kill of one
actor mid-step without losing a sample."""

from __future__ import annotations

import asyncio

import pytest

from rollout_accel.rollout.controller import RolloutController
from rollout_accel.rollout.pool import EnginePool
from tests.rollout.test_controller import (
    N,
    _check_group_shapes,
    _config,
    _items,
    _long_tail_hook,
    parity_reward,
)

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_engines():
    from rollout_accel.rollout.pool.ray_actors import start_ray_engines

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    engines = start_ray_engines(
        2, {"model_path": "tiny-qwen3", "max_running_requests": 64}, num_cpus_per_engine=0.5
    )
    yield engines
    ray.shutdown()


def test_ray_pool_step_and_actor_kill(ray_engines) -> None:
    from rollout_accel.rollout.prompts import ListPromptSource

    pool = EnginePool(ray_engines)
    ctl = RolloutController(
        pool,
        ListPromptSource(_items(), seed=3),
        parity_reward,
        _config("sync"),
        payload_hook=_long_tail_hook,
    )

    async def run():
        first = await ctl.step(0)
        used = {s.engine for s in first.spans}

        async def killer() -> None:
            while len(pool.timeline) < len(first.spans) + 4:  # the second step is under way
                await asyncio.sleep(0.01)
            ray.kill(ray_engines[0].actor)

        kill = asyncio.create_task(killer())
        second = await ctl.step(1)
        await kill
        return first, used, second

    first, used, second = asyncio.run(run())
    _check_group_shapes(first.groups, 6)
    assert used == {"ray-0", "ray-1"}  # both actors took work
    _check_group_shapes(second.groups, 6)
    assert not pool.engines[0].healthy and pool.engines[1].healthy
    assert "ray-0" in pool.stats.failed_engines
    assert pool.stats.redispatched > 0  # its in-flight requests went to ray-1
    assert all(len(g) == N for g in second.groups)
