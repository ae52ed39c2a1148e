"""Engines behind URLs: our `rollout serve`, real SGLang servers, or an SGLang router."""

from __future__ import annotations

import contextlib
from typing import Any

from rollout_accel.rollout.pool.base import EngineFailure
from rollout_accel.serving.client import EngineClient, ServerError, ServerUnavailableError


class HttpEngine:
    """One SGLang-protocol server. Connection loss and 5xx answers are engine failures (the pool
    re-dispatches); 4xx answers are the request's fault and propagate as ServerError."""

    def __init__(self, url: str, api_key: str | None = None, retries: int = 2) -> None:
        self.client = EngineClient(url, api_key=api_key, retries=retries, backoff=0.2)
        self.name = url

    async def _call(self, coro):
        try:
            return await coro
        except ServerUnavailableError as exc:
            raise EngineFailure(str(exc)) from exc
        except ServerError as exc:
            if exc.status >= 500:
                raise EngineFailure(str(exc)) from exc
            raise

    async def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await self._call(self.client.generate(payload))

    async def abort_all(self) -> None:
        await self._call(self.client.abort(abort_all=True))

    async def num_requests(self) -> int:
        return await self._call(self.client.num_requests())

    async def flush_cache(self) -> None:
        with contextlib.suppress(ServerError):  # busy: SGLang refuses while requests run
            await self._call(self.client.flush_cache())

    async def update_weights_from_tensor(
        self, named_tensors: list, weight_version: str | None
    ) -> None:
        reply = await self._call(
            self.client.update_weights_from_tensor(named_tensors, weight_version)
        )
        if not reply.get("success"):
            raise ValueError(reply.get("message"))

    async def close(self) -> None:
        await self.client.close()


async def expand_router(url: str, api_key: str | None = None) -> list[str]:
    """Worker URLs behind an SGLang router (its /workers list), or [url] for a plain server."""
    client = EngineClient(url, api_key=api_key, retries=1)
    try:
        _, body = await client.request("GET", "/workers")
    except (ServerError, ServerUnavailableError):
        return [url]
    finally:
        await client.close()
    import json

    try:
        workers = json.loads(body).get("workers", [])
        urls = [w["url"] for w in workers if "url" in w]
    except (ValueError, AttributeError, TypeError):
        return [url]
    return urls or [url]
