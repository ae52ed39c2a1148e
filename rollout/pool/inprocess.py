"""Engines living in this process (the embedded default on one machine)."""

from __future__ import annotations

import contextlib
from typing import Any

from rollout_accel.rollout.pool.base import EngineFailure
from rollout_accel.serving.engine import (
    Engine,
    EngineClosedError,
    EngineDeadError,
    RequestNotFoundError,
)
from rollout_accel.serving.server.protocol import parse_generate


class InProcessEngine:
    """An `Engine` behind the pool's handle interface; payloads are SGLang /generate bodies."""

    def __init__(self, engine: Engine, name: str = "local-0", owns_engine: bool = False) -> None:
        self.engine = engine
        self.name = name
        self._owns = owns_engine

    async def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        kwargs = parse_generate(payload)
        kwargs["stream"] = False
        try:
            return await self.engine.async_generate(**kwargs)
        except (EngineClosedError, EngineDeadError) as exc:
            raise EngineFailure(f"{self.name}: {exc}") from exc

    async def abort_all(self) -> None:
        if not self.engine.alive:
            raise EngineFailure(f"{self.name}: engine closed or failed")
        self.engine.abort(abort_all=True)

    async def abort_request(self, rid: str) -> None:
        if not self.engine.alive:
            raise EngineFailure(f"{self.name}: engine closed or failed")
        # A request that finished (or is not admitted yet) has nothing to stop.
        with contextlib.suppress(RequestNotFoundError):
            self.engine.abort(rid=rid)

    def supports_drafts(self) -> bool:
        """Speculative decoding from history drafts: an engine that accepts external corpora
        (SGLang's `/add_external_corpus`, as `add_external_corpus`) drafts from them."""
        return getattr(self.engine, "spec", None) is not None

    async def kv_capacity(self) -> int:
        """KV slots of the engine (tokens it can hold at once)."""
        return int(self.engine.server_info()["max_total_num_tokens"])

    async def num_requests(self) -> int:
        loads = self.engine.get_loads()
        return loads["num_running_reqs"] + loads["num_waiting_reqs"]

    async def flush_cache(self) -> None:
        self.engine.flush_cache()

    async def update_weights_from_tensor(
        self, named_tensors: list, weight_version: str | None
    ) -> None:
        ok, message = self.engine.update_weights_from_tensor(
            named_tensors, weight_version=weight_version
        )
        if not ok:
            raise ValueError(message)

    async def close(self) -> None:
        if self._owns:
            self.engine.shutdown()
