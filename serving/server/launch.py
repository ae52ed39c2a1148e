"""Starting the server: `rollout serve` (foreground) and `ServerThread` (in-process, for tests
and the bench's engine-URL mode).

Shutdown is bounded: on SIGTERM/SIGINT uvicorn waits at most `shutdown_grace_s` for in-flight
requests, the engine gets as long again to stop, and a watchdog ends the process
`2 * shutdown_grace_s + 5` seconds after the signal whatever the engine thread (or a worker thread
blocked on it) is doing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import replace
from typing import Any

import uvicorn

from rollout_accel.serving.engine import Engine
from rollout_accel.serving.server.app import build_app
from rollout_accel.serving.server.server_args import ServerArgs
from rollout_accel.serving.server.settings import ServerSettings

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _hard_exit_after(seconds: float, code: int) -> None:
    def run() -> None:
        time.sleep(seconds)
        log.error("shutdown did not finish within %.0f s; exiting now", seconds)
        os._exit(code)

    threading.Thread(target=run, name="rollout-accel-exit-watchdog", daemon=True).start()


def stop_engine(engine: Engine, timeout: float) -> bool:
    """Shuts the engine down from a helper thread; False if it did not finish within `timeout`
    (the engine thread is a daemon, so the process can still exit)."""
    worker = threading.Thread(target=engine.shutdown, name="rollout-accel-stop", daemon=True)
    worker.start()
    worker.join(timeout)
    return not worker.is_alive()


class _BoundedServer(uvicorn.Server):
    """uvicorn's server plus the exit watchdog, armed by the first exit signal."""

    def __init__(self, config: uvicorn.Config, watchdog_s: float) -> None:
        super().__init__(config)
        self._watchdog_s = watchdog_s
        self._armed = False

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self._armed:
            self._armed = True
            _hard_exit_after(self._watchdog_s, 128 + int(sig))
        super().handle_exit(sig, frame)


def serve(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 30000,
    api_key: str | None = None,
    log_level: str = "warning",
    settings: ServerSettings | None = None,
    server_args: ServerArgs | None = None,
) -> None:
    """Runs until interrupted; shuts the engine down on exit, within the bounds above.
    `server_args` is what `/server_info` reports beyond the engine config."""
    settings = settings or ServerSettings()
    grace = settings.shutdown_grace_s
    app = build_app(engine, api_key, settings, bound_host=host)
    app.state.server_args = replace(
        server_args or ServerArgs(), host=host, port=port, api_key=api_key
    )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_keep_alive=60,
        timeout_graceful_shutdown=grace,
    )
    try:
        _BoundedServer(config, watchdog_s=2 * grace + 5).run()
    finally:
        if not stop_engine(engine, grace):
            log.error("the engine did not stop within %.0f s; leaving it", grace)


class ServerThread:
    """A real HTTP server on loopback in a background thread; `url` once started."""

    def __init__(
        self,
        engine: Engine | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        api_key: str | None = None,
        settings: ServerSettings | None = None,
        server_args: ServerArgs | None = None,
        **engine_args: Any,
    ) -> None:
        self.engine = engine or Engine(**engine_args)
        self._owns_engine = engine is None
        self.host, self.port = host, port or free_port(host)
        app = build_app(self.engine, api_key, settings, bound_host=self.host)
        app.state.server_args = replace(
            server_args or ServerArgs(), host=self.host, port=self.port, api_key=api_key
        )
        config = uvicorn.Config(
            app,
            host=self.host,
            port=self.port,
            log_level="warning",
            timeout_keep_alive=60,
            timeout_graceful_shutdown=(settings or ServerSettings()).shutdown_grace_s,
            backlog=4096,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, name="rollout-accel-http", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.time() + timeout
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        if self._owns_engine:
            self.engine.shutdown()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
