"""Structured output: a JSON schema, regex or EBNF grammar masks each step's logits (SGLang's
`sampling_params.json_schema` / `regex` / `ebnf`, OpenAI's `response_format`).

Backed by xgrammar (an optional dependency: `pip install 'rollout-accel[structured]'`), imported
only when a request asks. Each constrained request holds a matcher; right before its draw,
`apply_grammars` feeds the matcher the tokens sampled since its last step, fills the request's
row of a token bitmask and masks that row of the logits in place (CPU, or xgrammar's GPU kernel).
Rows without a grammar are untouched, and steps without one cost one scan of the batch.

Invariant: a constrained request never runs in an overlapped step (its matcher must see the
previous token before the next mask), so the GPU runner's `can_overlap` refuses it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from rollout_accel.serving.engine.errors import InvalidRequestError

if TYPE_CHECKING:
    from rollout_accel.serving.engine.request import Request
    from rollout_accel.serving.engine.sampling_params import SamplingParams
    from rollout_accel.serving.models.tokenizer import TextTokenizer

GRAMMAR_KEYS = ("json_schema", "regex", "ebnf")
# OpenAI's response_format {"type": "json_object"}: any JSON value; SGLang spells it this way too.
ANY_JSON = "$$ANY$$"


def _xgrammar(field: str = "structured output") -> Any:
    try:
        import xgrammar
    except ImportError as exc:
        raise InvalidRequestError(
            f"{field}: structured output needs xgrammar on the server "
            "(pip install 'rollout-accel[structured]')"
        ) from exc
    return xgrammar


@functools.lru_cache(maxsize=4)
def _compiler(tokenizer: TextTokenizer, vocab_size: int, stop_ids: tuple[int, ...]) -> Any:
    """One xgrammar compiler per (tokenizer, model vocabulary); it caches compiled grammars."""
    xgr = _xgrammar()
    if not tokenizer.is_byte_level:
        raise InvalidRequestError(
            "structured output needs a byte-level (GPT-2 / Qwen / Llama-3 style) tokenizer"
        )
    # Specials as "" so no grammar ever emits them as text; ids past the tokenizer pad the vocab.
    vocab = [
        "" if i in tokenizer.special_ids else (tokenizer.piece(i) or "")
        for i in range(min(vocab_size, tokenizer.vocab_size))
    ]
    info = xgr.TokenizerInfo(
        vocab, xgr.VocabType.BYTE_LEVEL, vocab_size=vocab_size, stop_token_ids=list(stop_ids)
    )
    return xgr.GrammarCompiler(info, max_threads=1)


class GrammarState:
    """One request's matcher and how many of its output tokens it has consumed."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher
        self.consumed = 0

    def advance(self, output_ids: Sequence[int]) -> None:
        for token in output_ids[self.consumed :]:
            if not self.matcher.is_terminated():
                self.matcher.accept_token(token)
        self.consumed = len(output_ids)


def make_grammar(
    params: SamplingParams, tokenizer: TextTokenizer, vocab_size: int, stop_ids: Sequence[int]
) -> GrammarState | None:
    """Compiles the request's grammar (None when it has none); a grammar that does not compile
    is an InvalidRequestError naming the field."""
    given = [key for key in GRAMMAR_KEYS if getattr(params, key) is not None]
    if not given:
        return None
    key = given[0]
    if params.ignore_eos:
        # The grammar ends by allowing only eos; ignoring it would run on unconstrained.
        raise InvalidRequestError(f"sampling_params.ignore_eos: cannot be combined with {key}")
    source = getattr(params, key)
    _xgrammar(f"sampling_params.{key}")
    compiler = _compiler(tokenizer, vocab_size, tuple(stop_ids))
    try:
        if key == "json_schema" and source == ANY_JSON:
            compiled = compiler.compile_builtin_json_grammar()
        elif key == "json_schema":
            json.loads(source)
            # One space after ":" and "," (no free whitespace): models follow it, and a weak model
            # cannot wander through whitespace forever.
            compiled = compiler.compile_json_schema(source, any_whitespace=False)
        elif key == "regex":
            compiled = compiler.compile_regex(source)
        else:
            compiled = compiler.compile_grammar(source)
    except (RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[-1][:300]
        raise InvalidRequestError(f"sampling_params.{key}: cannot compile ({reason})") from exc
    return GrammarState(_xgrammar().GrammarMatcher(compiled))


def apply_grammars(requests: Sequence[Request], logits: torch.Tensor) -> None:
    """Masks, in place, the logits rows (one per request, in order) of constrained requests to
    the tokens their grammar allows next."""
    rows = [i for i, r in enumerate(requests) if r.grammar is not None]
    if not rows:
        return
    xgr = _xgrammar()
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[-1])
    masked = []
    for i in rows:
        # Only the token being drawn may be in flight: the grammar advances over the rest.
        assert requests[i].inflight <= 1, "a constrained request ran ahead of its outputs"
        state = requests[i].grammar
        state.advance(requests[i].output_ids)  # type: ignore[union-attr]
        if not state.matcher.is_terminated():  # type: ignore[union-attr]
            state.matcher.fill_next_token_bitmask(bitmask, i)  # type: ignore[union-attr]
            masked.append(i)
    if masked:
        xgr.apply_token_bitmask_inplace(
            logits, bitmask.to(logits.device, non_blocking=True), indices=masked
        )
