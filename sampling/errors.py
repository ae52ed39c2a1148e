"""Exceptions the sampling layer raises for input a caller can get wrong.

Every error names the field or file at fault. Errors raised while recording are raised before any
write, so a rejected call leaves the history exactly as it was.
"""

from __future__ import annotations


class SamplingError(Exception):
    """Base class of every error raised by `rollout_accel.sampling`."""


class InvalidPromptKeyError(SamplingError, TypeError):
    """A prompt key is neither a non-negative int (dataset index) nor a non-empty str (hash)."""


class UnknownPromptError(SamplingError, KeyError):
    """A prompt key has no history, where the call needs one."""

    def __str__(self) -> str:
        # KeyError's str() is the repr of its argument; keep the message readable.
        return str(self.args[0]) if self.args else "unknown prompt"


class InvalidRecordError(SamplingError, ValueError):
    """A group record (rewards, lengths, finish reasons, ...) is malformed; nothing was written."""


class InvalidConfigError(SamplingError, ValueError):
    """A sampling config holds an out-of-range or inconsistent value."""


class InvalidArgumentError(SamplingError, ValueError):
    """A call argument is malformed: mismatched lengths, duplicate keys, a negative budget."""


class HistoryFormatError(SamplingError):
    """The history file is corrupt, or is not a rollout-accel history database."""


class HistorySchemaError(HistoryFormatError):
    """The history file was written by a newer schema than this library reads."""


class ReadOnlyHistoryError(SamplingError):
    """A write was attempted through a store opened read-only."""


class CheckpointNotFoundError(SamplingError, FileNotFoundError):
    """`HistoryStore.load(rollout_id)` found no snapshot for that rollout id."""
