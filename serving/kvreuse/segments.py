"""How a client marks the reusable segments of a prompt, over the SGLang protocol.

Two ways, both invisible to a real SGLang server:

1. **The `segments` field of `/generate`** (our extension; SGLang has no such field, so send it
   only to our servers or strip it for SGLang): a list of `[start, end)` token ranges over
   `input_ids`, ascending and non-overlapping, e.g.

       {"input_ids": [...1200 ids...], "segments": [[40, 552], [552, 1064], [1064, 1180]],
        "sampling_params": {...}}

   Each range is one chunk (a document, another agent's output): if its exact token ids were
   stored before, its KV is reused (re-rotated to this position, then selectively recomputed);
   otherwise it is computed and stored for the next prompt. Tokens outside every range are always
   computed. For a batch (`input_ids` a list of lists) `segments` is a list with one such list
   per prompt (`[]` or `null` for none). With `text` prompts use the separator instead (token
   boundaries are the server's business).
2. **A separator** (LMCache's convention): the server is started with a separator token sequence;
   the tokens between two separators (or the prompt's ends) form a segment; the separators
   themselves are ordinary prompt tokens. Works for text and id prompts alike.

Bad markings are refused with `InvalidRequestError` (HTTP 400) naming the field and the index.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rollout_accel.serving.engine.errors import InvalidRequestError

SEGMENTS_FIELD = "segments"

Segment = tuple[int, int]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_segments(value: Any, prompt_len: int, field: str = SEGMENTS_FIELD) -> list[Segment]:
    """The `segments` of one prompt of `prompt_len` tokens -> sorted `(start, end)` ranges.

    `None` (absent) and `[]` mean no segments. Raises InvalidRequestError naming `field` (and
    `field[i]`) for anything but ascending, non-overlapping, non-empty int ranges within the
    prompt.
    """
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidRequestError(f"{field}: expected a list of [start, end] pairs")
    out: list[Segment] = []
    prev_end = 0
    for i, pair in enumerate(value):
        name = f"{field}[{i}]"
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise InvalidRequestError(f"{name}: expected a [start, end] pair, got {pair!r}")
        start, end = pair
        if not (_is_int(start) and _is_int(end)):
            raise InvalidRequestError(f"{name}: start and end must be integers, got {pair!r}")
        if start < 0 or end > prompt_len:
            raise InvalidRequestError(
                f"{name}: [{start}, {end}) is outside the prompt's {prompt_len} tokens"
            )
        if end <= start:
            raise InvalidRequestError(f"{name}: end must be greater than start, got {pair!r}")
        if start < prev_end:
            raise InvalidRequestError(
                f"{name}: segments must be ascending and non-overlapping "
                f"(starts at {start}, the previous one ends at {prev_end})"
            )
        out.append((start, end))
        prev_end = end
    return out


def parse_segments_batch(
    value: Any, prompt_lens: Sequence[int], field: str = SEGMENTS_FIELD
) -> list[list[Segment]]:
    """`segments` of a batched request: one list (or null) per prompt, in prompt order."""
    if value is None:
        return [[] for _ in prompt_lens]
    if not isinstance(value, list) or len(value) != len(prompt_lens):
        raise InvalidRequestError(
            f"{field}: a batch of {len(prompt_lens)} prompts needs a list of "
            f"{len(prompt_lens)} segment lists"
        )
    return [
        parse_segments(v, n, f"{field}[{i}]")
        for i, (v, n) in enumerate(zip(value, prompt_lens, strict=True))
    ]


def split_on_separator(input_ids: Sequence[int], separator: Sequence[int]) -> list[Segment]:
    """Segments between occurrences of the token sequence `separator` (which stays a prompt
    token run of its own). Empty stretches give no segment."""
    sep = list(separator)
    if not sep:
        raise ValueError("separator: expected at least one token id")
    ids = list(input_ids)
    out: list[Segment] = []
    start = 0
    i = 0
    width = len(sep)
    while i + width <= len(ids):
        if ids[i : i + width] == sep:
            if i > start:
                out.append((start, i))
            i += width
            start = i
        else:
            i += 1
    if len(ids) > start:
        out.append((start, len(ids)))
    return out
