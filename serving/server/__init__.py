"""SGLang-protocol HTTP server over the embedded engine.

Imported lazily: `serving.server.protocol` (request parsing, tensor serialization) is used by the
in-process pool and must not pull FastAPI into environments that only run the engine.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServerThread", "build_app", "free_port", "serve"]


def __getattr__(name: str) -> Any:
    if name == "build_app":
        from rollout_accel.serving.server.app import build_app

        return build_app
    if name in ("ServerThread", "free_port", "serve"):
        from rollout_accel.serving.server import launch

        return getattr(launch, name)
    raise AttributeError(name)
