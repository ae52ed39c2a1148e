"""SGLang's sampling parameters, validated field by field."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from rollout_accel.serving.engine.errors import InvalidRequestError

# SGLang's structural tags are refused explicitly rather than silently ignored (json_schema,
# regex and ebnf are implemented by engine/grammar.py).
_UNSUPPORTED = {"structural_tag"}
# Accepted and ignored: they change nothing in our outputs.
_IGNORED = {"spaces_between_special_tokens", "stream_interval", "logit_bias", "lora_path"}
# Integer fields reach the sampler as int64 tensors: anything outside this range would fail inside
# an engine step (hurting every request in it) instead of at the edge.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Engine-wide bound of `n` (one call's fan-out); the HTTP server's --max-n is usually lower.
MAX_N = 1024


@dataclass(slots=True)
class SamplingParams:
    """One request's decoding settings; defaults are SGLang's.

    temperature 0 means greedy; top_k -1 (or 0) means off; top_p 1 means off.
    """

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    sampling_seed: int | None = None
    custom_params: dict[str, Any] | None = None
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (
            self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, vocab_size: int | None = None) -> SamplingParams:
        """Builds and validates; raises InvalidRequestError naming the offending key."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise InvalidRequestError(
                f"sampling_params: expected an object, got {type(raw).__name__}"
            )
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            if key in _IGNORED:
                continue
            if key in _UNSUPPORTED:
                if value is None:
                    continue
                raise InvalidRequestError(f"sampling_params.{key}: not supported by this server")
            if key not in known:
                raise InvalidRequestError(f"sampling_params.{key}: unknown key")
            if value is None and key not in (
                "sampling_seed",
                "custom_params",
                "json_schema",
                "regex",
                "ebnf",
                "stop",
                "stop_token_ids",
            ):
                continue
            kwargs[key] = value
        params = cls(**kwargs)
        params._validate(vocab_size)
        return params

    def _validate(self, vocab_size: int | None) -> None:
        def number(name: str, integer: bool = False) -> float:
            value = getattr(self, name)
            ok = isinstance(value, int) if integer else isinstance(value, int | float)
            if isinstance(value, bool) or not ok:
                kind = "an integer" if integer else "a number"
                raise InvalidRequestError(f"sampling_params.{name}: expected {kind}, got {value!r}")
            if not integer and not math.isfinite(value):
                raise InvalidRequestError(f"sampling_params.{name}: must be finite, got {value!r}")
            if integer and not INT64_MIN <= value <= INT64_MAX:
                raise InvalidRequestError(
                    f"sampling_params.{name}: outside the signed 64-bit range, got {_short(value)}"
                )
            return value

        if number("max_new_tokens", integer=True) < 0:
            raise InvalidRequestError(
                f"sampling_params.max_new_tokens: must be >= 0, got {self.max_new_tokens}"
            )
        if number("min_new_tokens", integer=True) < 0:
            raise InvalidRequestError("sampling_params.min_new_tokens: must be >= 0")
        if number("temperature") < 0:
            raise InvalidRequestError(
                f"sampling_params.temperature: must be >= 0, got {self.temperature}"
            )
        if not 0.0 < number("top_p") <= 1.0:
            raise InvalidRequestError(f"sampling_params.top_p: must be in (0, 1], got {self.top_p}")
        top_k = number("top_k", integer=True)
        if top_k < -1:
            raise InvalidRequestError(
                f"sampling_params.top_k: must be -1 (off) or >= 1, got {top_k}"
            )
        if not 0.0 <= number("min_p") <= 1.0:
            raise InvalidRequestError(f"sampling_params.min_p: must be in [0, 1], got {self.min_p}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= number(name) <= 2.0:
                raise InvalidRequestError(f"sampling_params.{name}: must be in [-2, 2]")
        if not 0.0 < number("repetition_penalty") <= 2.0:
            raise InvalidRequestError("sampling_params.repetition_penalty: must be in (0, 2]")
        if not 1 <= number("n", integer=True) <= MAX_N:
            raise InvalidRequestError(f"sampling_params.n: must be in [1, {MAX_N}], got {self.n}")
        for name in ("ignore_eos", "skip_special_tokens", "no_stop_trim"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(f"sampling_params.{name}: expected true or false")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequestError(
                "sampling_params.stop: expected a non-empty string or a list of them"
            )
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if isinstance(self.stop_token_ids, int) and not isinstance(self.stop_token_ids, bool):
            self.stop_token_ids = [self.stop_token_ids]
        if not isinstance(self.stop_token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids
        ):
            raise InvalidRequestError("sampling_params.stop_token_ids: expected a list of integers")
        if vocab_size is not None:
            bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"sampling_params.stop_token_ids: {bad[0]} is outside the vocabulary [0, {vocab_size})"
                )
        if self.sampling_seed is not None and (
            isinstance(self.sampling_seed, bool) or not isinstance(self.sampling_seed, int)
        ):
            raise InvalidRequestError("sampling_params.sampling_seed: expected an integer")
        # Sample i of n uses seed + i, an int64 on the device: the whole range must fit.
        if self.sampling_seed is not None and not (
            INT64_MIN <= self.sampling_seed <= INT64_MAX - (self.n - 1)
        ):
            raise InvalidRequestError(
                f"sampling_params.sampling_seed: must be in [-2**63, 2**63 - n], "
                f"got {_short(self.sampling_seed)}"
            )
        grammars = [k for k in ("json_schema", "regex", "ebnf") if getattr(self, k) is not None]
        for key in grammars:
            if not isinstance(getattr(self, key), str):
                raise InvalidRequestError(f"sampling_params.{key}: expected a string")
        if len(grammars) > 1:
            raise InvalidRequestError(
                f"sampling_params.{grammars[1]}: give only one of json_schema, regex, ebnf"
            )
        if self.custom_params is not None and not isinstance(self.custom_params, dict):
            raise InvalidRequestError("sampling_params.custom_params: expected an object")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"an integer of {len(text)} digits"
