"""Errors a caller can cause; each message names the field and the problem."""

from __future__ import annotations


class EngineError(Exception):
    """Base for errors raised by the engine."""


class InvalidRequestError(EngineError, ValueError):
    """A request the engine refuses (HTTP 400); the engine keeps serving everything else."""


class RequestNotFoundError(EngineError, KeyError):
    """An rid the engine does not know (HTTP 404)."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "request not found"


class EngineClosedError(EngineError, RuntimeError):
    """The engine was shut down."""


class EngineDeadError(EngineError, RuntimeError):
    """The engine thread failed in a way it could not contain (HTTP 500); it serves nothing more."""
