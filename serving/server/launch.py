"""Starting the server: `rollout serve` (foreground) and `ServerThread` (in-process, for tests
and the bench's engine-URL mode)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import replace
from typing import Any

import uvicorn

from rollout_accel.serving.engine import Engine
from rollout_accel.serving.server.app import build_app
from rollout_accel.serving.server.server_args import ServerArgs


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def serve(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 30000,
    api_key: str | None = None,
    log_level: str = "warning",
    server_args: ServerArgs | None = None,
) -> None:
    """Runs until interrupted; shuts the engine down on exit. `server_args` is what
    `/server_info` reports beyond the engine config (default: host, port and key as given)."""
    app = build_app(engine, api_key)
    app.state.server_args = replace(
        server_args or ServerArgs(), host=host, port=port, api_key=api_key
    )
    try:
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_level=log_level,
            timeout_keep_alive=60,
        )
    finally:
        engine.shutdown()


class ServerThread:
    """A real HTTP server on loopback in a background thread; `url` once started."""

    def __init__(
        self,
        engine: Engine | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        api_key: str | None = None,
        server_args: ServerArgs | None = None,
        **engine_args: Any,
    ) -> None:
        self.engine = engine or Engine(**engine_args)
        self._owns_engine = engine is None
        self.host, self.port = host, port or free_port(host)
        app = build_app(self.engine, api_key)
        app.state.server_args = replace(
            server_args or ServerArgs(), host=self.host, port=self.port, api_key=api_key
        )
        config = uvicorn.Config(
            app,
            host=self.host,
            port=self.port,
            log_level="warning",
            timeout_keep_alive=60,
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
