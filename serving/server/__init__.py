"""SGLang-protocol HTTP server over the embedded engine."""

from rollout_accel.serving.server.app import build_app
from rollout_accel.serving.server.launch import ServerThread, free_port, serve

__all__ = ["ServerThread", "build_app", "free_port", "serve"]
