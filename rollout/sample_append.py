"""One engine answer onto a `Sample`: the seam between the controller and slime's `Sample`.

The type owns its mutation: slime's `Sample.append_response_tokens` (slime >= the version that
has it: it also replays top-p data and routed experts and checks every length) when slime is
importable; our fallback `Sample` has a method of the same name and rules otherwise. A slime too
old for that method gets the same appending here plus its own `update_from_meta_info`.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from rollout_accel.rollout.sample_types import Sample


def engine_tokens(out: dict[str, Any]) -> tuple[list[int], list[float] | None]:
    """(token ids, their log probs or None) of one SGLang /generate answer."""
    meta = out.get("meta_info") or {}
    pairs = meta.get("output_token_logprobs") or []
    if pairs:
        return [int(t) for _, t, *_ in pairs], [float(lp) for lp, *_ in pairs]
    tokens = [int(t) for t in out.get("output_ids") or []]
    return tokens, (None if tokens else [])


def append_output(sample: Sample, out: dict[str, Any], args: Any = None) -> int:
    """Appends the answer's tokens, log probs, text and meta_info to `sample` (slime's rules);
    returns the number of tokens appended. `args`: slime's args where there are some (e.g.
    `sglang_speculative_algorithm` turns on spec stats), else None."""
    tokens, log_probs = engine_tokens(out)
    meta = out.get("meta_info") or {}
    text = out.get("text", "")
    append = getattr(sample, "append_response_tokens", None)
    if append is not None:
        append(args, tokens=tokens, log_probs=log_probs, meta_info=meta, text=text)
        return len(tokens)
    # A slime without append_response_tokens: its Sample still owns the meta_info part.
    if tokens and log_probs is None:
        raise ValueError("trainable response tokens require rollout log probabilities.")
    before = sample.response_length
    sample.response = (sample.response or "") + text
    sample.tokens = list(sample.tokens) + tokens
    sample.response_length += len(tokens)
    sample.loss_mask = list(sample.loss_mask or [1] * before) + [1] * len(tokens)
    sample.rollout_log_probs = list(sample.rollout_log_probs or [0.0] * before) + list(
        log_probs or []
    )
    if args is None:  # that method reads args.sglang_speculative_algorithm unconditionally
        args = SimpleNamespace(sglang_speculative_algorithm=None)
    sample.update_from_meta_info(args, meta)
    return len(tokens)
