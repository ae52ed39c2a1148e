"""Running validated engine requests for one HTTP call: await them, and abort them when the
client goes away.

Invariant: a request the server submitted either finishes or is aborted; a client that hangs up
(non-streaming or streaming) never leaves its requests generating. Uses only the public Engine
API (`submit`, `abort`, `stream_request`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from rollout_accel.serving.engine import Engine, InvalidRequestError, RequestNotFoundError
from rollout_accel.serving.engine.request import Request as EngineRequest

Receive = Callable[[], Awaitable[dict[str, Any]]]


async def wait_for_disconnect(receive: Receive) -> None:
    """Returns once the client has disconnected (the ASGI `http.disconnect` message).

    Only for use after the body was read: every later message is either the disconnect or
    nothing (the server blocks until the client goes away or the response completes)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def abort_requests(engine: Engine, rids: list[str]) -> None:
    """Best-effort abort of `rids` (finished or unknown ones are skipped)."""
    for rid in rids:
        with contextlib.suppress(RequestNotFoundError, InvalidRequestError):
            await asyncio.to_thread(engine.abort, rid)


async def run_requests(
    engine: Engine,
    requests: list[EngineRequest],
    disconnected: Awaitable[None] | None = None,
    timeout: float | None = None,
) -> list[dict[str, Any]] | None:
    """Submits `requests` and returns their final outputs in order.

    Returns None (after aborting what is still running) if `disconnected` completes first or
    `timeout` passes. An output carrying an engine "error" raises InvalidRequestError."""
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[dict[str, Any]]] = [loop.create_future() for _ in requests]

    def sink_for(fut: asyncio.Future[dict[str, Any]]):
        def sink(out: dict[str, Any], finished: bool) -> None:
            if finished:
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(out))

        return sink

    engine.submit(requests, [sink_for(f) for f in futures], wait=False)
    gathered = asyncio.ensure_future(asyncio.gather(*futures))
    watcher = asyncio.ensure_future(disconnected) if disconnected is not None else None
    waiting = {gathered} | ({watcher} if watcher is not None else set())
    try:
        done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if watcher is not None:
            watcher.cancel()
    if gathered not in done:
        gathered.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gathered
        await abort_requests(engine, [r.rid for r in requests])
        return None
    outs = gathered.result()
    for out in outs:
        if "error" in out:
            raise InvalidRequestError(out["error"]["message"])
    return outs


async def stream_until_disconnect(
    chunks: AsyncIterator[bytes], receive: Receive
) -> AsyncIterator[bytes]:
    """Relays `chunks` until they end or the client disconnects; closing `chunks` on the way out
    aborts the engine request (Engine.stream_request aborts when its consumer stops early)."""
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    iterator = chunks.__aiter__()
    try:
        while True:
            step = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({step, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if step not in done:
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await step
                return
            try:
                yield step.result()
            except StopAsyncIteration:
                return
    finally:
        watcher.cancel()
        with contextlib.suppress(Exception):
            await iterator.aclose()  # type: ignore[attr-defined]
