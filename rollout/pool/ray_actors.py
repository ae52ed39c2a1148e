"""Engines as Ray actors: one engine per actor (one GPU each when the cluster has GPUs).

Local `ray.init()` by default; pass an address to join a cluster. An actor that dies (OOM, node
loss, `ray.kill`) surfaces as an EngineFailure and the pool re-dispatches its requests.
"""

from __future__ import annotations

import contextlib
from typing import Any

from rollout_accel.rollout.pool.base import EngineFailure


class _EngineActor:
    """The actor body (wrapped with ray.remote at runtime so Ray stays an optional import)."""

    def __init__(self, engine_args: dict[str, Any]) -> None:
        from rollout_accel.serving.engine import Engine

        self.engine = Engine(**engine_args)

    def ready(self) -> bool:
        return True

    async def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        from rollout_accel.serving.server.protocol import parse_generate

        kwargs = parse_generate(payload)
        kwargs["stream"] = False
        return await self.engine.async_generate(**kwargs)

    def abort_all(self) -> int:
        return self.engine.abort(abort_all=True)

    def num_requests(self) -> int:
        loads = self.engine.get_loads()
        return loads["num_running_reqs"] + loads["num_waiting_reqs"]

    def flush_cache(self) -> bool:
        return self.engine.flush_cache()

    def update_weights_from_tensor(
        self, named_tensors: list, weight_version: str | None
    ) -> tuple[bool, str]:
        return self.engine.update_weights_from_tensor(named_tensors, weight_version=weight_version)


class RayEngine:
    """Handle over one engine actor."""

    def __init__(self, actor: Any, name: str) -> None:
        self.actor = actor
        self.name = name

    async def _call(self, ref):
        import ray

        try:
            return await ref
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            raise EngineFailure(f"{self.name}: {type(exc).__name__}") from exc

    async def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await self._call(self.actor.generate.remote(payload))

    async def abort_all(self) -> None:
        await self._call(self.actor.abort_all.remote())

    async def num_requests(self) -> int:
        return await self._call(self.actor.num_requests.remote())

    async def flush_cache(self) -> None:
        await self._call(self.actor.flush_cache.remote())

    async def update_weights_from_tensor(
        self, named_tensors: list, weight_version: str | None
    ) -> None:
        ok, message = await self._call(
            self.actor.update_weights_from_tensor.remote(named_tensors, weight_version)
        )
        if not ok:
            raise ValueError(message)

    async def close(self) -> None:
        import ray

        with contextlib.suppress(Exception):  # already dead
            ray.kill(self.actor)


def start_ray_engines(
    count: int,
    engine_args: dict[str, Any],
    address: str | None = None,
    num_gpus_per_engine: float | None = None,
    num_cpus_per_engine: float = 1,
) -> list[RayEngine]:
    """Starts `count` engine actors and waits until each has loaded its model."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False
        )
    if num_gpus_per_engine is None:
        num_gpus_per_engine = 1 if ray.cluster_resources().get("GPU", 0) >= count else 0
    actor_cls = ray.remote(
        num_cpus=num_cpus_per_engine, num_gpus=num_gpus_per_engine, max_concurrency=4096
    )(_EngineActor)
    actors = [actor_cls.remote(engine_args) for _ in range(count)]
    ray.get([a.ready.remote() for a in actors])
    return [RayEngine(a, f"ray-{i}") for i, a in enumerate(actors)]
