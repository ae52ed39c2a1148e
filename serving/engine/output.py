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
        with_text = req.return_text_in_logprobs
        meta["output_token_logprobs"] = [
            [lp, tid, tokenizer.token_text(tid) if with_text else None]
            for lp, tid in zip(req.output_logprobs, req.output_ids, strict=True)
        ]
        start = max(req.logprob_start_len, 0)
        meta["input_token_logprobs"] = (
            [
                [lp, tid, tokenizer.token_text(tid) if with_text else None]
                for lp, tid in zip(req.input_logprobs[start:], req.input_ids[start:], strict=False)
            ]
            if req.logprob_start_len >= 0
            else []
        )
    return {
        "text": output_text(req, tokenizer, text),
        "output_ids": list(req.output_ids),
        "meta_info": meta,
    }
