"""The plugin's process-wide state: one background event loop (slime calls us synchronously from
its RolloutManager actor; aiohttp sessions and SQLite connections belong to the loop that made
them), the runtime of the current `args`, and the open history stores.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from rollout_accel.rollout.slime_settings import (
    history_path_from_args,
    settings_from_args,
)
from rollout_accel.sampling import HistoryStore

if TYPE_CHECKING:
    from rollout_accel.rollout.slime.runtime import _Runtime

T = TypeVar("T")


# -- the background loop -----------------------------------------------------------------------
class _BackgroundLoop:
    """One event loop on a daemon thread; `run` blocks the caller until a coroutine is done."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, name="rollout-accel-slime", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            raise RuntimeError("rollout_accel.rollout.slime: called from its own event loop")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs a plain function on the loop's thread (SQLite objects live there)."""

        async def wrapper() -> T:
            return fn(*args)

        return self.run(wrapper())


class _Plugin:
    """The process-wide state: the loop, the runtime of the current `args`, history stores."""

    def __init__(self) -> None:
        self.loop = _BackgroundLoop()
        self.runtime: _Runtime | None = None
        self.stores: dict[str, HistoryStore] = {}  # by resolved path; used on the loop only
        self._tmpdir: str | None = None

    def history_path(self, args: Any) -> str:
        path = history_path_from_args(args)
        if path is None:
            if self._tmpdir is None:
                self._tmpdir = tempfile.mkdtemp(prefix="rollout-accel-history-")
            path = os.path.join(self._tmpdir, "accel_history.db")
        return str(Path(path).resolve())

    def store(self, path: str) -> HistoryStore:
        """The open store at `path` (opened on first use); call on the loop thread only."""
        if path not in self.stores:
            self.stores[path] = HistoryStore(path)
        return self.stores[path]

    def runtime_for(self, args: Any) -> _Runtime:
        """The runtime of these `args`; a different args object (a new run) rebuilds it."""
        if self.runtime is not None and self.runtime.args is args:
            return self.runtime
        from rollout_accel.rollout.slime.runtime import _Runtime

        settings = settings_from_args(args)
        old, self.runtime = self.runtime, None
        if old is not None:
            self.loop.run(old.close())
        self.runtime = self.loop.run(_Runtime.create(args, settings, self))
        return self.runtime

    def shutdown(self) -> None:
        runtime, self.runtime = self.runtime, None
        if runtime is not None:
            self.loop.run(runtime.close())
        stores, self.stores = self.stores, {}
        if stores:
            self.loop.call(lambda: [s.close() for s in stores.values()])


_PLUGIN: _Plugin | None = None
_PLUGIN_LOCK = threading.Lock()


def _plugin() -> _Plugin:
    global _PLUGIN
    with _PLUGIN_LOCK:
        if _PLUGIN is None:
            _PLUGIN = _Plugin()
        return _PLUGIN


def shutdown() -> None:
    """Closes the engine connections and history stores (the loop thread stays, idle). A later
    call starts afresh; tests call this between runs with different settings."""
    if _PLUGIN is not None:
        _PLUGIN.shutdown()
