"""The nouns of the sampling layer: prompt keys, one group's record, and a prompt's summary.

A *group* is the n responses a rollout step generated for one prompt. The controller hands the
history a `GroupRecord` per finished group; the history answers with a `PromptStats` per prompt.
Everything else in `sampling/` reads `PromptStats` only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

import numpy as np

from .errors import InvalidPromptKeyError, InvalidRecordError

PromptKey = int | str
"""A stable prompt identity: a dataset index (int >= 0) or a hash of the prompt's token ids (str).
An int key and a str key never compare equal (1 and "1" are different prompts)."""

FINISH_REASONS = ("stop", "length", "abort")
"""SGLang's `meta_info.finish_reason.type` values; stored as their index in this tuple."""

_MAX_TOKEN_ID = 2**31 - 1


class GroupOutcome(IntEnum):
    """How one group's rewards fell. Only MIXED groups carry a GRPO advantage."""

    MIXED = 0
    ALL_PASS = 1
    ALL_FAIL = 2
    EMPTY = 3  # every sample was aborted: nothing learned about the prompt

    @property
    def zero_variance(self) -> bool:
        return self in (GroupOutcome.ALL_PASS, GroupOutcome.ALL_FAIL)


@dataclass(frozen=True, slots=True)
class GroupRecord:
    """One finished group of a rollout step, as the controller reports it.

    `rewards`, `lengths` (response tokens) and, when given, `finish_reasons`, `truncated` and
    `responses` hold one entry per sample. `truncated` defaults to finish_reason == "length".
    Aborted samples are stored but ignored by every statistic.
    """

    key: PromptKey
    rewards: Sequence[float]
    lengths: Sequence[int]
    finish_reasons: Sequence[str] | None = None
    truncated: Sequence[bool] | None = None
    weight_version: str | int | None = None
    prompt_length: int | None = None
    responses: Sequence[Sequence[int]] | None = None


class PromptStats(NamedTuple):
    """A prompt's history, summarised; what the selector, allocator and length predictor read.

    Counts (`groups`, `samples`, `zero_var_groups`) are exact. `pass_*`, `length_*` and
    `truncation_rate` are discounted: each recorded group multiplies older evidence by the store's
    `decay`, so a prompt whose pass rate drifts during training is tracked, not averaged away.
    An immutable NamedTuple rather than a frozen dataclass: thousands are built per scoring call
    and a frozen dataclass's __init__ is ~8x slower.
    """

    key: PromptKey
    groups: int
    samples: int
    first_step: int
    last_step: int
    zero_var_streak: int  # consecutive latest groups that were ALL_PASS or ALL_FAIL
    last_outcome: GroupOutcome
    zero_var_groups: int
    pass_successes: float
    pass_trials: float
    length_weight: float
    length_log_mean: float
    length_log_var: float
    length_mean: float
    truncation_rate: float
    prompt_length: int | None
    skips_since_rollout: int
    last_skip_step: int | None
    weight_version: str | None
    responses_stored: int

    def pass_rate(self, prior_rate: float = 0.5, prior_strength: float = 2.0) -> float:
        """Posterior mean pass rate under a Beta prior centred on `prior_rate`."""
        a, b = self.beta(prior_rate, prior_strength)
        return a / (a + b)

    def beta(self, prior_rate: float = 0.5, prior_strength: float = 2.0) -> tuple[float, float]:
        """Beta(a, b) posterior of the pass rate from the discounted pass counts."""
        a = prior_strength * prior_rate + self.pass_successes
        b = prior_strength * (1.0 - prior_rate) + (self.pass_trials - self.pass_successes)
        return a, b


def prompt_key_for_tokens(token_ids: Sequence[int]) -> str:
    """A stable str key for a prompt from its token ids (BLAKE2b-128 of the int64 ids)."""
    data = np.asarray(token_ids, dtype=np.int64).tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def check_prompt_key(key: object) -> PromptKey:
    """Return `key` if it is a valid prompt key; raise InvalidPromptKeyError naming it otherwise."""
    kind = type(key)
    if (kind is int and 0 <= key < 2**63) or (kind is str and key):  # type: ignore[operator]
        return key  # type: ignore[return-value]
    if isinstance(key, bool) or not isinstance(key, int | str | np.integer):
        raise InvalidPromptKeyError(
            f"prompt key {key!r} has type {type(key).__name__}; expected int (dataset index) "
            "or str (hash of prompt token ids)"
        )
    if isinstance(key, np.integer):
        key = int(key)
    if isinstance(key, int) and not 0 <= key < 2**63:
        raise InvalidPromptKeyError(f"prompt key {key} is out of range [0, 2**63)")
    if isinstance(key, str) and not key:
        raise InvalidPromptKeyError("prompt key is an empty string")
    return key


@dataclass(slots=True)
class CheckedGroup:
    """A validated `GroupRecord` as arrays; built only by `check_group`."""

    key: PromptKey
    rewards: np.ndarray  # float64 [n]
    lengths: np.ndarray  # int64 [n]
    finish: np.ndarray  # uint8 [n], index into FINISH_REASONS
    truncated: np.ndarray  # bool [n]
    weight_version: str | None
    prompt_length: int | None
    responses: list[np.ndarray] | None  # int32 each

    @property
    def valid(self) -> np.ndarray:
        """Mask of samples that count in statistics (not aborted)."""
        return self.finish != FINISH_REASONS.index("abort")


def check_group(record: object, index: int) -> CheckedGroup:
    """Validate one record; raise InvalidRecordError naming the field and the problem."""
    if not isinstance(record, GroupRecord):
        raise InvalidRecordError(
            f"groups[{index}] is a {type(record).__name__}; expected GroupRecord"
        )
    key = check_prompt_key(record.key)
    where = f"groups[{index}] (prompt {key!r})"

    rewards = _array(record.rewards, np.float64, where, "rewards")
    if rewards.ndim != 1 or rewards.size == 0:
        raise InvalidRecordError(
            f"{where}: field 'rewards' has shape {rewards.shape}; expected a non-empty 1-D "
            "sequence with one reward per sample"
        )
    n = rewards.size
    bad = np.flatnonzero(~np.isfinite(rewards))
    if bad.size:
        raise InvalidRecordError(
            f"{where}: field 'rewards' holds a non-finite value ({rewards[bad[0]]}) at sample "
            f"{int(bad[0])}"
        )

    lengths = _array(record.lengths, None, where, "lengths")
    _expect_shape(lengths, n, where, "lengths")
    if lengths.dtype.kind not in "iu":
        raise InvalidRecordError(
            f"{where}: field 'lengths' has dtype {lengths.dtype}; expected integers"
        )
    lengths = lengths.astype(np.int64)
    if (lengths < 0).any():
        raise InvalidRecordError(f"{where}: field 'lengths' holds a negative length")

    finish = _finish_codes(record.finish_reasons, n, where)
    if record.truncated is None:
        truncated = finish == FINISH_REASONS.index("length")
    else:
        truncated = _array(record.truncated, None, where, "truncated")
        _expect_shape(truncated, n, where, "truncated")
        if truncated.dtype.kind != "b":
            raise InvalidRecordError(
                f"{where}: field 'truncated' has dtype {truncated.dtype}; expected bools"
            )

    prompt_length = record.prompt_length
    if prompt_length is not None and (
        isinstance(prompt_length, bool)
        or not isinstance(prompt_length, int | np.integer)
        or prompt_length < 0
    ):
        raise InvalidRecordError(
            f"{where}: field 'prompt_length' is {prompt_length!r}; expected an int >= 0 or None"
        )

    version = record.weight_version
    if version is not None and not isinstance(version, str | int):
        raise InvalidRecordError(
            f"{where}: field 'weight_version' has type {type(version).__name__}; "
            "expected str, int or None"
        )

    responses = None
    if record.responses is not None:
        if len(record.responses) != n:
            raise InvalidRecordError(
                f"{where}: field 'responses' has {len(record.responses)} entries; expected {n} "
                "(one token list per sample)"
            )
        responses = []
        for j, tokens in enumerate(record.responses):
            arr = _array(tokens, None, where, f"responses[{j}]")
            if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
                raise InvalidRecordError(
                    f"{where}: field 'responses[{j}]' must be a 1-D sequence of token ids"
                )
            if arr.size and (arr.min() < 0 or arr.max() > _MAX_TOKEN_ID):
                raise InvalidRecordError(
                    f"{where}: field 'responses[{j}]' holds a token id outside [0, 2**31)"
                )
            responses.append(arr.astype(np.int32))

    return CheckedGroup(
        key=key,
        rewards=rewards,
        lengths=lengths,
        finish=finish,
        truncated=truncated.astype(bool),
        weight_version=None if version is None else str(version),
        prompt_length=None if prompt_length is None else int(prompt_length),
        responses=responses,
    )


def _array(value: object, dtype: type | None, where: str, field: str) -> np.ndarray:
    if isinstance(value, str | bytes):
        raise InvalidRecordError(f"{where}: field '{field}' is a string; expected a sequence")
    try:
        return np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise InvalidRecordError(f"{where}: field '{field}' is not numeric: {exc}") from None


def _expect_shape(arr: np.ndarray, n: int, where: str, field: str) -> None:
    if arr.shape != (n,):
        raise InvalidRecordError(
            f"{where}: field '{field}' has shape {arr.shape}; expected ({n},) to match 'rewards'"
        )


def _finish_codes(reasons: Sequence[object] | None, n: int, where: str) -> np.ndarray:
    if reasons is None:
        return np.zeros(n, dtype=np.uint8)
    if isinstance(reasons, str) or len(reasons) != n:
        got = "a string" if isinstance(reasons, str) else f"{len(reasons)} entries"
        raise InvalidRecordError(
            f"{where}: field 'finish_reasons' has {got}; expected {n} (one per sample)"
        )
    codes = np.empty(n, dtype=np.uint8)
    for j, reason in enumerate(reasons):
        # SGLang reports {"type": "stop", ...}; accept that form as well as the bare type.
        kind = reason.get("type") if isinstance(reason, dict) else reason
        if kind not in FINISH_REASONS:
            raise InvalidRecordError(
                f"{where}: field 'finish_reasons[{j}]' is {reason!r}; expected one of "
                f"{', '.join(FINISH_REASONS)}"
            )
        codes[j] = FINISH_REASONS.index(kind)
    return codes


def log_length(lengths: np.ndarray) -> np.ndarray:
    """log(max(length, 1)): the scale on which lengths are modelled (they are heavy-tailed)."""
    return np.log(np.maximum(lengths, 1).astype(np.float64))
