"""OpenAI-compatible `/v1/completions`, `/v1/chat/completions` (streaming too) and `/v1/models`.

Agent rollouts speak OpenAI; these map onto the same engine requests as `/generate`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from rollout_accel.serving.engine import Engine, InvalidRequestError
from rollout_accel.serving.server.protocol import check_fields, parse_json_object

_COMMON = {
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "stop_token_ids",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "ignore_eos",
    "skip_special_tokens",
    "no_stop_trim",
    "user",
    "logprobs",
    "min_tokens",
    "rid",
}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "suffix", "best_of"}
CHAT_FIELDS = _COMMON | {
    "messages",
    "top_logprobs",
    "add_generation_prompt",
    "tools",
    "tool_choice",
    "response_format",
    "parallel_tool_calls",
}


def _sampling_params(body: dict[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {
        "max_new_tokens": body.get("max_completion_tokens") or body.get("max_tokens") or 16,
    }
    mapping = {
        "temperature": "temperature",
        "top_p": "top_p",
        "top_k": "top_k",
        "min_p": "min_p",
        "stop": "stop",
        "stop_token_ids": "stop_token_ids",
        "seed": "sampling_seed",
        "presence_penalty": "presence_penalty",
        "frequency_penalty": "frequency_penalty",
        "repetition_penalty": "repetition_penalty",
        "ignore_eos": "ignore_eos",
        "skip_special_tokens": "skip_special_tokens",
        "no_stop_trim": "no_stop_trim",
        "min_tokens": "min_new_tokens",
    }
    for src, dst in mapping.items():
        if body.get(src) is not None:
            params[dst] = body[src]
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        params["max_new_tokens"] = 16 if "prompt" in body else 1024
    return params


def _finish(out: dict[str, Any]) -> str | None:
    reason = out["meta_info"]["finish_reason"]
    return None if reason is None else reason["type"]


def _usage(outs: list[dict[str, Any]]) -> dict[str, int]:
    prompt = outs[0]["meta_info"]["prompt_tokens"] if outs else 0
    completion = sum(o["meta_info"]["completion_tokens"] for o in outs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _logprobs(out: dict[str, Any], engine: Engine) -> dict[str, Any]:
    pairs = out["meta_info"].get("output_token_logprobs", [])
    return {
        "tokens": [engine.tokenizer.token_text(tid) for _, tid, _ in pairs],
        "token_logprobs": [lp for lp, _, _ in pairs],
        "top_logprobs": None,
        "text_offset": None,
    }


def _sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def register_openai_routes(app: FastAPI, engine: Engine) -> None:
    model_name = engine.config.model_path

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": model_name,
                        "object": "model",
                        "created": 0,
                        "owned_by": "rollout-accel",
                        "max_model_len": engine.context_length,
                    }
                ],
            }
        )

    async def run(body: dict[str, Any], prompt_kwargs: dict[str, Any], kind: str) -> Response:
        params = _sampling_params(body)
        n = body.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InvalidRequestError("n: must be a positive integer")
        params["n"] = n
        want_logprobs = bool(body.get("logprobs"))
        created = int(time.time())
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        stream = body.get("stream", False)
        if stream:
            if n != 1:
                raise InvalidRequestError("n: streaming supports n == 1 only")
            requests, batched = engine.make_requests(
                **prompt_kwargs,
                sampling_params=params,
                return_logprob=want_logprobs,
                rid=rid,
                stream=True,
            )
            if batched:
                raise InvalidRequestError("prompt: streaming supports a single prompt only")
            return StreamingResponse(
                _stream(engine.stream_request(requests[0]), rid, created, kind),
                media_type="text/event-stream",
            )
        outs = await engine.async_generate(
            **prompt_kwargs, sampling_params=params, return_logprob=want_logprobs
        )
        outs = outs if isinstance(outs, list) else [outs]
        choices = []
        for index, out in enumerate(outs):
            if kind == "chat":
                choice = {
                    "index": index,
                    "message": {"role": "assistant", "content": out["text"]},
                    "finish_reason": _finish(out),
                    "logprobs": _logprobs(out, engine) if want_logprobs else None,
                }
            else:
                choice = {
                    "index": index,
                    "text": out["text"],
                    "finish_reason": _finish(out),
                    "logprobs": _logprobs(out, engine) if want_logprobs else None,
                }
            choices.append(choice)
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": created,
                "model": model_name,
                "choices": choices,
                "usage": _usage(outs),
            }
        )

    async def _stream(
        chunks: AsyncIterator[dict[str, Any]], rid: str, created: int, kind: str
    ) -> AsyncIterator[bytes]:
        sent = ""
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        first = True
        try:
            async for out in chunks:
                delta_text = (
                    out["text"][len(sent) :] if out["text"].startswith(sent) else out["text"]
                )
                sent = out["text"]
                reason = _finish(out)
                if kind == "chat":
                    delta: dict[str, Any] = {"content": delta_text}
                    if first:
                        delta["role"] = "assistant"
                    choice = {"index": 0, "delta": delta, "finish_reason": reason}
                else:
                    choice = {"index": 0, "text": delta_text, "finish_reason": reason}
                first = False
                yield _sse_event(
                    {
                        "id": rid,
                        "object": obj,
                        "created": created,
                        "model": model_name,
                        "choices": [choice],
                    }
                )
        except InvalidRequestError as exc:
            yield _sse_event({"error": {"message": str(exc)}})
        yield b"data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse_json_object(await request.body(), "completions")
        check_fields(body, COMPLETION_FIELDS, "completions")
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (
            isinstance(prompt, list) and prompt and isinstance(prompt[0], str)
        ):
            kwargs: dict[str, Any] = {"prompt": prompt}
        elif isinstance(prompt, list) and prompt:
            kwargs = {"input_ids": prompt}
        else:
            raise InvalidRequestError("prompt: expected a string, a list of strings or token ids")
        return await run(body, kwargs, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse_json_object(await request.body(), "chat/completions")
        check_fields(body, CHAT_FIELDS, "chat/completions")
        messages = body.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise InvalidRequestError(
                "messages: expected a non-empty list of {role, content} objects"
            )
        text = engine.tokenizer.apply_chat_template(
            messages, add_generation_prompt=body.get("add_generation_prompt", True)
        )
        return await run(body, {"input_ids": engine.tokenizer.encode(text)}, "chat")
