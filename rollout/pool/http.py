"""Engines behind URLs: our `rollout serve`, real SGLang servers, or an SGLang router.

An `HttpEngine` watches its server: a background probe calls `/health` every `probe_interval_s`
(each call bounded by `probe_timeout_s`). `probe_failures` misses in a row mark the engine down
(`alive` False): requests in flight on it fail at once as EngineFailure, so the pool re-dispatches
them, and their connections close, so our server aborts them. While down, the probe backs off
(doubling, up to `max_backoff_s`); the first answer marks it up again, so an engine restarted on
the same port is re-admitted. `request_timeout_s` is a per-request deadline: a generate that
exceeds it is aborted by rid on the server and fails over like a lost connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from rollout_accel.rollout.pool.base import EngineFailure
from rollout_accel.serving.client import EngineClient, ServerError, ServerUnavailableError

log = logging.getLogger(__name__)


class HttpEngine:
    """One SGLang-protocol server. Connection loss, timeouts, failed health probes and 5xx
    answers are engine failures (the pool re-dispatches); 4xx answers are the request's fault
    and propagate as ServerError. See the module docstring for probing and re-admission."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        retries: int = 2,
        request_timeout_s: float | None = None,
        probe_interval_s: float = 1.0,
        probe_timeout_s: float = 2.0,
        probe_failures: int = 2,
        max_backoff_s: float = 8.0,
    ) -> None:
        self.client = EngineClient(
            url, api_key=api_key, retries=retries, backoff=0.2, timeout=request_timeout_s
        )
        self._prober = EngineClient(url, api_key=api_key, retries=0, timeout=probe_timeout_s)
        self.name = url
        self.probe_interval_s = probe_interval_s
        self.probe_failures = probe_failures
        self.max_backoff_s = max_backoff_s
        self.alive = True
        self._down: asyncio.Event | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- health -----------------------------------------------------------------------------
    def watch(self) -> asyncio.Event:
        """Starts the probe in the running loop (again if the loop changed); the down event."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._probe_task is None or self._probe_task.done():
            self._loop = loop
            self._down = asyncio.Event()
            if not self.alive:
                self._down.set()
            self._probe_task = loop.create_task(self._probe_loop(), name=f"probe {self.name}")
        assert self._down is not None
        return self._down

    def mark_down(self, reason: str = "") -> None:
        """Called by the pool when a request failed here: down until a probe answers."""
        if self.alive:
            log.warning("engine %s marked down: %s", self.name, reason)
        self.alive = False
        if self._down is not None:
            self._down.set()

    def _mark_up(self) -> None:
        if not self.alive:
            log.warning("engine %s answers again; re-admitted", self.name)
        self.alive = True
        if self._down is not None:
            self._down.clear()

    async def _probe_loop(self) -> None:
        misses, delay = 0, self.probe_interval_s
        while True:
            await asyncio.sleep(delay)
            if await self._prober.health():
                misses, delay = 0, self.probe_interval_s
                self._mark_up()
                continue
            misses += 1
            if misses >= self.probe_failures:
                self.mark_down(f"{misses} health probes failed")
            if not self.alive:
                delay = min(max(delay, self.probe_interval_s) * 2, self.max_backoff_s)

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
        down = self.watch()
        if down.is_set():
            raise EngineFailure(f"{self.name}: down (failed health probes)")
        work = asyncio.ensure_future(self._call(self.client.generate(payload)))
        watcher = asyncio.ensure_future(down.wait())
        try:
            done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if work in done:
            return work.result()
        work.cancel()  # closes the connection: our server aborts the request
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
        raise EngineFailure(f"{self.name}: went down while the request ran")

    async def abort_all(self) -> None:
        self.watch()
        await self._call(self.client.abort(abort_all=True))

    async def num_requests(self) -> int:
        self.watch()
        return await self._call(self.client.num_requests())

    async def abort_request(self, rid: str) -> None:
        """Aborts one request by id (a tail-budget cut); an unknown rid (finished, or not on
        this engine) is not an error."""
        self.watch()
        try:
            await self._call(self.client.abort(rid=rid))
        except ServerError as exc:
            if exc.status != 404:
                raise

    async def kv_capacity(self) -> int:
        """KV slots of the server (`max_total_num_tokens` of `/server_info`)."""
        self.watch()
        info = await self._call(self.client.server_info())
        return int(info["max_total_num_tokens"])

    async def drafting(self) -> bool:
        """Whether the server does speculative decoding (SGLang's `speculative_algorithm`)."""
        info = await self._call(self.client.server_info())
        self._drafts = bool(info.get("speculative_algorithm"))
        return self._drafts

    def supports_drafts(self) -> bool:
        """Known once `drafting()` was awaited (the pool asks at start); False before."""
        return bool(getattr(self, "_drafts", False))

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
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await self._probe_task
            self._probe_task = None
        await self.client.close()
        await self._prober.close()


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
