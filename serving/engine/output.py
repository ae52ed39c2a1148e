"""SGLang-shaped response dicts: {"text", "output_ids", "meta_info"}."""

from __future__ import annotations

import time
from typing import Any

from rollout_accel.serving.engine.request import Request
from rollout_accel.serving.models.tokenizer import TextTokenizer


def output_text(req: Request, tokenizer: TextTokenizer, text: str | None = None) -> str:
    """Decoded output (or `text`, already decoded); a matched stop string (and what follows it)
    is trimmed unless no_stop_trim."""
    if text is None:
        text = tokenizer.decode(req.output_ids, skip_special_tokens=req.params.skip_special_tokens)
    reason = req.finish_reason or {}
    matched = reason.get("matched")
    if reason.get("type") == "stop" and isinstance(matched, str) and not req.params.no_stop_trim:
        cut = text.find(matched)
        if cut >= 0:
            text = text[:cut]
    return text


def build_output(
    req: Request, tokenizer: TextTokenizer, weight_version: str, text: str | None = None
) -> dict[str, Any]:
    end = req.finish_time or time.perf_counter()
    meta: dict[str, Any] = {
        "id": req.rid,
        "finish_reason": req.finish_reason,
        "prompt_tokens": len(req.input_ids),
        "completion_tokens": len(req.output_ids),
        "cached_tokens": req.cached_tokens,
        "weight_version": weight_version,
        "e2e_latency": end - req.arrival_time,
    }
    if req.return_logprob:
        token_text = tokenizer.token_text if req.return_text_in_logprobs else None

        def triple(logprob: float | None, token_id: int) -> list[Any]:
            return [logprob, token_id, token_text(token_id) if token_text else None]

        meta["output_token_logprobs"] = [
            triple(lp, tid) for lp, tid in zip(req.output_logprobs, req.output_ids, strict=True)
        ]
        # SGLang's shape: prompt positions logprob_start_len.. (none by default); the first entry
        # has no logprob even when logprob_start_len > 0.
        start = req.logprob_start_len if req.logprob_start_len >= 0 else len(req.input_ids)
        positions = range(start, len(req.input_ids))
        known = req.input_logprobs
        meta["input_token_logprobs"] = [
            triple(
                known[p] if index > 0 and p < len(known) else None,
                req.input_ids[p],
            )
            for index, p in enumerate(positions)
        ]
        if req.extra_logprobs is not None:
            meta.update(req.extra_logprobs.meta_fields(positions, len(req.output_ids), token_text))
    return {
        "text": output_text(req, tokenizer, text),
        "output_ids": list(req.output_ids),
        "meta_info": meta,
    }
