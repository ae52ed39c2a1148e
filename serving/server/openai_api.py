"""OpenAI-compatible `/v1/completions`, `/v1/chat/completions` (streaming too) and `/v1/models`.

Agent rollouts and benchmark clients speak OpenAI; these map onto the same engine requests as
`/generate`. Every field is either implemented to the OpenAI spec or refused with a 400 that names
it; nothing is silently dropped. Structured output (`response_format` json_object / json_schema,
SGLang's `json_schema` / `regex` / `ebnf`) goes through engine/grammar.py. Refused: tool calling
(`tools`), `logit_bias`, `suffix`, streaming with n > 1, and message parts other than text.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from rollout_accel.serving.engine import Engine, InvalidRequestError
from rollout_accel.serving.engine.grammar import ANY_JSON
from rollout_accel.serving.models.tokenizer import TextTokenizer
from rollout_accel.serving.server.protocol import check_fields, parse_json_object

_COMMON = {
    "model",
    "max_tokens",
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
    # Structured output (see _grammar).
    "response_format",
    "json_schema",
    "regex",
    "ebnf",
    # Refused unless they carry their default (see _refuse_non_default).
    "logit_bias",
}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "suffix", "best_of"}
CHAT_FIELDS = _COMMON | {
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "add_generation_prompt",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
}
MESSAGE_FIELDS = {"role", "content"}
# Chat's top_logprobs is 0..20 in the OpenAI spec.
MAX_CHAT_TOP_LOGPROBS = 20


def _grammar(body: dict[str, Any]) -> tuple[str, str, str] | None:
    """(sampling_params key, grammar source, field it came from) for structured output:
    OpenAI's response_format (json_object, json_schema) or SGLang's json_schema / regex / ebnf."""
    found: list[tuple[str, str, str]] = []
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":
            found.append(("json_schema", ANY_JSON, "response_format"))
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise InvalidRequestError(
                    "response_format.json_schema.schema: expected a JSON schema object"
                )
            found.append(("json_schema", json.dumps(schema), "response_format"))
        elif kind != "text":
            raise InvalidRequestError(
                f"response_format: type {kind!r} is not supported; "
                "use text, json_object or json_schema"
            )
    for key in ("json_schema", "regex", "ebnf"):
        value = body.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise InvalidRequestError(f"{key}: expected a string")
            found.append((key, value, key))
    if len(found) > 1:
        raise InvalidRequestError(f"{found[1][2]}: give only one structured-output constraint")
    return found[0] if found else None


def _refuse_non_default(body: dict[str, Any]) -> None:
    """Fields we accept only at their default: anything else would be silently ignored."""
    if body.get("logit_bias"):
        raise InvalidRequestError("logit_bias: not supported by this server")
    if body.get("suffix"):
        raise InvalidRequestError("suffix: insertion (suffix) is not supported by this server")
    if body.get("tools"):
        raise InvalidRequestError("tools: tool calling is not supported by this server")
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise InvalidRequestError(
            "tool_choice: tool calling is not supported by this server (use 'none' or omit)"
        )
    if not isinstance(body.get("parallel_tool_calls", False), bool):
        raise InvalidRequestError("parallel_tool_calls: expected true or false")


def _flag(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{key}: expected true or false, got {value!r}")
    return value


def _int(body: dict[str, Any], key: str, low: int, high: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    bad = isinstance(value, bool) or not isinstance(value, int) or value < low
    if bad or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise InvalidRequestError(f"{key}: expected an integer {bound}, got {value!r}")
    return value


def _sampling_params(body: dict[str, Any], kind: str) -> dict[str, Any]:
    # OpenAI (and SGLang) refuse max_tokens <= 0: a completion of nothing is not a request.
    limit = _int(body, "max_completion_tokens", 1) if kind == "chat" else None
    limit = limit if limit is not None else _int(body, "max_tokens", 1)
    params: dict[str, Any] = {
        "max_new_tokens": limit if limit is not None else (16 if kind == "completion" else 1024)
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
    grammar = _grammar(body)
    if grammar is not None:
        params[grammar[0]] = grammar[1]
    return params


@dataclass(slots=True)
class _Plan:
    """What one OpenAI call asks of the engine and how to shape its answer."""

    kind: str  # "chat" or "completion"
    n: int
    best_of: int
    logprobs: bool
    top_n: int
    echo: bool
    stream: bool
    include_usage: bool
    continuous_usage: bool


def _plan(body: dict[str, Any], kind: str) -> _Plan:
    _refuse_non_default(body)
    _grammar(body)
    n = _int(body, "n", 1) or 1
    stream = _flag(body, "stream", False)
    options = body.get("stream_options")
    include_usage = continuous = False
    if options is not None:
        if not stream:
            raise InvalidRequestError("stream_options: only allowed when stream is true")
        if not isinstance(options, dict):
            raise InvalidRequestError("stream_options: expected an object")
        check_fields(options, {"include_usage", "continuous_usage_stats"}, "stream_options")
        include_usage = _flag(options, "include_usage", False)
        continuous = _flag(options, "continuous_usage_stats", False)
    if kind == "chat":
        logprobs = _flag(body, "logprobs", False)
        top_n = _int(body, "top_logprobs", 0, MAX_CHAT_TOP_LOGPROBS)
        if top_n is not None and not logprobs:
            raise InvalidRequestError("top_logprobs: requires logprobs: true")
        echo, best_of = False, n
    else:
        top_n = _int(body, "logprobs", 0)
        logprobs = top_n is not None
        echo = _flag(body, "echo", False)
        best_of = _int(body, "best_of", 1) or n
        if best_of < n:
            raise InvalidRequestError(f"best_of: must be >= n ({n}), got {best_of}")
        if best_of > n and stream:
            raise InvalidRequestError("best_of: cannot be combined with stream (OpenAI's rule)")
    if stream and n != 1:
        raise InvalidRequestError("n: streaming supports n == 1 only")
    return _Plan(kind, n, best_of, logprobs, top_n or 0, echo, stream, include_usage, continuous)


def _finish(out: dict[str, Any]) -> str | None:
    reason = out["meta_info"]["finish_reason"]
    return None if reason is None else reason["type"]


def _usage(outs: list[dict[str, Any]], per_prompt: int) -> dict[str, int]:
    """Prompt tokens once per prompt (n samples of a prompt share it), completions summed."""
    prompt = sum(o["meta_info"]["prompt_tokens"] for o in outs[::per_prompt])
    completion = sum(o["meta_info"]["completion_tokens"] for o in outs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _legacy_token(tok: TextTokenizer, token_id: int) -> str:
    """A token's string for the completions logprobs: its text, except that a fragment of a
    multi-byte character (text U+FFFD) is spelled one latin-1 character per raw byte, so distinct
    fragments stay distinct keys in top_logprobs (SGLang does the same)."""
    text = tok.token_text(token_id)
    if "\ufffd" in text:
        raw = bytes(tok.token_bytes(token_id))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("latin-1")
    return text


def _completion_logprobs(
    meta: dict[str, Any],
    tok: TextTokenizer,
    plan: _Plan,
    first: int,
    with_prompt: bool,
    offset: int,
) -> dict[str, Any]:
    """OpenAI's legacy shape from output position `first` on (plus the prompt's positions with
    echo): tokens, token_logprobs, top_logprobs (a {token: logprob} dict per position, None where
    nothing predicted it), text_offset (character offsets into the returned text)."""
    triples = list(meta["input_token_logprobs"]) if with_prompt else []
    tops = list(meta.get("input_top_logprobs", [])) if with_prompt else []
    triples += meta["output_token_logprobs"][first:]
    tops += meta.get("output_top_logprobs", [])[first:]
    tokens = [_legacy_token(tok, tid) for _, tid, _ in triples]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [lp for lp, _, _ in triples],
        "top_logprobs": (
            [
                None if row is None else {_legacy_token(tok, t): lp for lp, t, _ in row}
                for row in tops
            ]
            if plan.top_n > 0
            else None
        ),
        "text_offset": offsets,
    }


def _chat_logprobs(meta: dict[str, Any], tok: TextTokenizer, first: int) -> dict[str, Any]:
    """OpenAI's chat shape: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    triples = meta["output_token_logprobs"][first:]
    tops = meta.get("output_top_logprobs", [])[first:]

    def entry(logprob: float, token_id: int) -> dict[str, Any]:
        return {
            "token": tok.token_text(token_id),
            "logprob": logprob,
            "bytes": tok.token_bytes(token_id),
        }

    content = []
    for index, (lp, tid, _) in enumerate(triples):
        row = tops[index] if index < len(tops) and tops[index] else []
        content.append({**entry(lp, tid), "top_logprobs": [entry(v, t) for v, t, _ in row]})
    return {"content": content, "refusal": None}


def _chat_text(messages: Any) -> list[dict[str, str]]:
    """Messages with their content as one string; text parts are joined, anything else is a 400
    naming where it is."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages: expected a non-empty list of {role, content} objects")
    plain: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequestError(f"messages[{i}]: expected an object with a string 'role'")
        for key in message:
            if key not in MESSAGE_FIELDS:
                raise InvalidRequestError(f"messages[{i}].{key}: not supported by this server")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise InvalidRequestError(
                        f"messages[{i}].content[{j}]: only text parts are supported, got {kind!r}"
                    )
                if not isinstance(part.get("text"), str):
                    raise InvalidRequestError(f"messages[{i}].content[{j}].text: expected a string")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise InvalidRequestError(
                f"messages[{i}].content: expected a string or a list of text parts"
            )
        plain.append({"role": message["role"], "content": content})
    return plain


def _sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def register_openai_routes(app: FastAPI, engine: Engine) -> None:
    model_name = engine.config.model_path
    tok = engine.tokenizer

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

    async def run(body: dict[str, Any], prompt_kwargs: dict[str, Any], plan: _Plan) -> Response:
        try:
            return await _run(body, prompt_kwargs, plan)
        except InvalidRequestError as exc:
            grammar = _grammar(body)
            prefix = f"sampling_params.{grammar[0]}: " if grammar else None
            if prefix and str(exc).startswith(prefix):
                raise InvalidRequestError(f"{grammar[2]}: {str(exc)[len(prefix) :]}") from exc
            raise

    async def _run(body: dict[str, Any], prompt_kwargs: dict[str, Any], plan: _Plan) -> Response:
        params = _sampling_params(body, plan.kind)
        params["n"] = plan.best_of
        ranked = plan.best_of > plan.n  # best_of needs every candidate's logprobs to rank them
        kwargs = dict(
            sampling_params=params,
            return_logprob=plan.logprobs or ranked,
            top_logprobs_num=plan.top_n,
            logprob_start_len=0 if plan.echo and plan.logprobs else None,
        )
        created = int(time.time())
        rid = f"{'chatcmpl' if plan.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        echoes: list[str] = prompt_kwargs.pop("echo_texts", [])
        if plan.stream:
            requests, batched = engine.make_requests(
                **prompt_kwargs, **kwargs, rid=rid, stream=True
            )
            if batched:
                raise InvalidRequestError("prompt: streaming supports a single prompt only")
            echo_text = echoes[0] if plan.echo else ""
            return StreamingResponse(
                _stream(engine.stream_request(requests[0]), rid, created, plan, echo_text),
                media_type="text/event-stream",
            )
        outs = await engine.async_generate(**prompt_kwargs, **kwargs)
        outs = outs if isinstance(outs, list) else [outs]
        usage = _usage(outs, plan.best_of)
        if ranked:
            groups = [outs[i : i + plan.best_of] for i in range(0, len(outs), plan.best_of)]
            outs = [
                out
                for group in groups
                for out in sorted(
                    group,
                    key=lambda o: -sum(lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]),
                )[: plan.n]
            ]
        choices = []
        for index, out in enumerate(outs):
            meta = out["meta_info"]
            if plan.kind == "chat":
                choice: dict[str, Any] = {
                    "index": index,
                    "message": {"role": "assistant", "content": out["text"]},
                    "logprobs": _chat_logprobs(meta, tok, 0) if plan.logprobs else None,
                }
            else:
                echo_text = echoes[index // plan.n] if plan.echo else ""
                choice = {
                    "index": index,
                    "text": echo_text + out["text"],
                    "logprobs": (
                        _completion_logprobs(meta, tok, plan, 0, plan.echo, 0)
                        if plan.logprobs
                        else None
                    ),
                }
            choice["finish_reason"] = _finish(out)
            choices.append(choice)
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion" if plan.kind == "chat" else "text_completion",
                "created": created,
                "model": model_name,
                "choices": choices,
                "usage": usage,
            }
        )

    async def _stream(
        chunks: AsyncIterator[dict[str, Any]], rid: str, created: int, plan: _Plan, echo: str
    ) -> AsyncIterator[bytes]:
        sent = ""
        sent_tokens = 0
        offset = 0  # text_offset: characters of token text streamed so far (echo included)
        obj = "chat.completion.chunk" if plan.kind == "chat" else "text_completion"
        first = True
        last: dict[str, Any] | None = None
        try:
            async for out in chunks:
                last = out
                text = out["text"][len(sent) :] if out["text"].startswith(sent) else out["text"]
                sent = out["text"]
                meta = out["meta_info"]
                if plan.kind == "chat":
                    delta = {"role": "assistant", "content": text} if first else {"content": text}
                    logprobs = _chat_logprobs(meta, tok, sent_tokens) if plan.logprobs else None
                    choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": logprobs}
                else:
                    choice = {"index": 0, "text": (echo if first else "") + text, "logprobs": None}
                    if plan.logprobs:
                        lp = _completion_logprobs(
                            meta, tok, plan, sent_tokens, first and plan.echo, offset
                        )
                        offset += sum(len(t) for t in lp["tokens"])
                        choice["logprobs"] = lp
                choice["finish_reason"] = _finish(out)
                sent_tokens = meta["completion_tokens"]
                first = False
                event: dict[str, Any] = {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": model_name,
                    "choices": [choice],
                }
                if plan.include_usage:
                    event["usage"] = _usage([out], 1) if plan.continuous_usage else None
                yield _sse_event(event)
            if plan.include_usage and last is not None:
                yield _sse_event(
                    {
                        "id": rid,
                        "object": obj,
                        "created": created,
                        "model": model_name,
                        "choices": [],
                        "usage": _usage([last], 1),
                    }
                )
        except InvalidRequestError as exc:
            yield _sse_event({"error": {"message": str(exc), "code": 400}})
        yield b"data: [DONE]\n\n"

    def _echo_text(ids: Any) -> str:
        """The prompt's text for echo; bad ids decode to "" here and are refused (naming the
        field) when the request is built."""
        valid = isinstance(ids, list) and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < tok.vocab_size for t in ids
        )
        return tok.decode(ids, skip_special_tokens=False) if valid else ""

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse_json_object(await request.body(), "completions")
        check_fields(body, COMPLETION_FIELDS, "completions")
        plan = _plan(body, "completion")
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (
            isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt)
        ):
            texts = [prompt] if isinstance(prompt, str) else prompt
            kwargs: dict[str, Any] = {"prompt": prompt, "echo_texts": texts}
        elif isinstance(prompt, list) and prompt:
            id_lists = prompt if isinstance(prompt[0], list) else [prompt]
            kwargs = {"input_ids": prompt, "echo_texts": [_echo_text(ids) for ids in id_lists]}
        else:
            raise InvalidRequestError("prompt: expected a string, a list of strings or token ids")
        return await run(body, kwargs, plan)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse_json_object(await request.body(), "chat/completions")
        check_fields(body, CHAT_FIELDS, "chat/completions")
        plan = _plan(body, "chat")
        messages = _chat_text(body.get("messages"))
        text = tok.apply_chat_template(
            messages, add_generation_prompt=_flag(body, "add_generation_prompt", True)
        )
        return await run(body, {"input_ids": tok.encode(text)}, plan)
