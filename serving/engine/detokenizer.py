"""Incremental detokenisation: each new token decodes a short window, not the whole output.

Byte-level tokens can split a UTF-8 character; a window that ends inside one decodes to U+FFFD,
so text is only released once the window decodes cleanly. Used for streamed chunks and stop
strings; a finished request's text is decoded once, in full, by the output builder.
"""

from __future__ import annotations

from dataclasses import dataclass

from rollout_accel.serving.models.tokenizer import TextTokenizer


@dataclass(slots=True)
class DetokenizerState:
    """`text` is the decoded form of `ids[:read_offset]`; `prefix_offset` starts the window
    that is decoded again for context (so merges across token boundaries come out right)."""

    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0


def advance(
    state: DetokenizerState, ids: list[int], tokenizer: TextTokenizer, skip_special_tokens: bool
) -> str:
    """Brings `state.text` up to `ids` (the output so far) and returns it."""
    if state.read_offset >= len(ids):
        return state.text
    before = tokenizer.decode(
        ids[state.prefix_offset : state.read_offset], skip_special_tokens=skip_special_tokens
    )
    after = tokenizer.decode(ids[state.prefix_offset :], skip_special_tokens=skip_special_tokens)
    if len(after) > len(before) and not after.endswith("\ufffd"):
        state.text += after[len(before) :]
        state.prefix_offset = state.read_offset
        state.read_offset = len(ids)
    return state.text
