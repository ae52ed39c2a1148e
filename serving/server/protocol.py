"""Request bodies of the SGLang HTTP API, checked field by field (unknown fields are refused).

We parse JSON ourselves instead of binding pydantic models so every refusal is a 400 whose message
names the field, the same for every endpoint, and so SGLang's optional fields that we accept but
ignore are listed in one place.
"""

from __future__ import annotations

import json
from typing import Any

from rollout_accel.serving.engine.errors import InvalidRequestError
from rollout_accel.serving.server.weight_payload import (  # noqa: F401  (re-exported)
    deserialize_named_tensors,
    serialize_named_tensors,
)

GENERATE_FIELDS = {
    "text",
    "input_ids",
    "sampling_params",
    "rid",
    "return_logprob",
    "logprob_start_len",
    "top_logprobs_num",
    "token_ids_logprob",
    "return_text_in_logprobs",
    "stream",
    "priority",
    # Our extension (KV reuse; ignored by SGLang): [[start, end], ...] over input_ids.
    "segments",
    "ttft_slo_ms",  # our extension (the `slo` policy's per-request TTFT deadline); not SGLang's
}
# SGLang fields we accept when they carry their default (absent, null or false) and refuse
# otherwise, since we would silently drop what they ask for.
GENERATE_DEFAULT_ONLY = {
    "input_embeds",
    "image_data",
    "audio_data",
    "video_data",
    "lora_path",
    "lora_id",
    "session_params",
    "custom_logit_processor",
    "return_hidden_states",
    "modalities",
    "bootstrap_host",
    "bootstrap_port",
    "bootstrap_room",
    "data_parallel_rank",
    "background",
    "return_bytes",
    "extra_key",
    "no_logs",
    "custom_labels",
    "return_routed_experts",
    "return_entropy",
}

# Fields with no effect on the output that sglang-router fills in when it forwards a /generate
# (the model id it routed on, SGLang's default `log_metrics: true`); accepted at any value.
ROUTER_ADDED_FIELDS = {"model", "log_metrics"}


# Bounds of integer fields handed to torch as int64 (seeds) or compared by the scheduler
# (priority); a signed 64-bit range is what SGLang's int fields can hold too.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_JSON_DEPTH = 32


def parse_json_object(raw: bytes, endpoint: str, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    """Parses a JSON object body; any malformed, oversized-number or too-deep body is a 400."""
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        if "digits" in str(exc):  # an integer past Python's 4,300-digit conversion limit
            raise InvalidRequestError(f"{endpoint}: an integer in the body is too long") from exc
        raise InvalidRequestError(f"{endpoint}: the body is not valid JSON ({exc})") from exc
    except RecursionError as exc:
        raise InvalidRequestError(
            f"{endpoint}: the body is nested deeper than {max_depth} levels"
        ) from exc
    if not isinstance(body, dict):
        raise InvalidRequestError(f"{endpoint}: the body must be a JSON object")
    path = _too_deep(body, max_depth)
    if path is not None:
        raise InvalidRequestError(f"{path}: nested deeper than {max_depth} levels")
    return body


def _too_deep(body: dict[str, Any], max_depth: int) -> str | None:
    """The first field (dotted path) whose value nests deeper than `max_depth`, else None.
    Iterative, so checking a deep body cannot itself overflow the stack."""
    stack: list[tuple[Any, int, str]] = [(body, 1, "")]
    while stack:
        value, depth, path = stack.pop()
        if depth > max_depth:
            return path or "body"
        if isinstance(value, dict):
            stack.extend(
                (v, depth + 1, f"{path}.{k}" if path else str(k)) for k, v in value.items()
            )
        elif isinstance(value, list):
            stack.extend((v, depth + 1, path) for v in value)
    return None


def check_int(value: Any, name: str, low: int = INT64_MIN, high: int = INT64_MAX) -> int:
    """`value` as an int in [low, high]; InvalidRequestError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name}: expected an integer, got {_show(value)}")
    if not low <= value <= high:
        raise InvalidRequestError(f"{name}: must be in [{low}, {high}], got {_show(value)}")
    return value


def _show(value: Any) -> str:
    """A short rendering of a bad value for an error message (never a 5,000-digit echo)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**30:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value) if not isinstance(value, dict | list) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def check_fields(body: dict[str, Any], allowed: set[str], endpoint: str) -> None:
    for key in body:
        if key not in allowed:
            raise InvalidRequestError(f"{endpoint}: unknown field {key!r}")


def parse_generate(
    body: dict[str, Any], max_n: int | None = None, max_text_chars: int | None = None
) -> dict[str, Any]:
    """Validates a /generate body; returns Engine.make_requests keyword arguments.

    Checks here are the ones the engine cannot make itself (fields it would only trip over
    inside a step, like a non-integer `priority`) and the server's own limits (`max_n`,
    `max_text_chars`); the engine validates token ids and sampling parameters."""
    for key, value in body.items():
        if key in ROUTER_ADDED_FIELDS:
            continue
        if key in GENERATE_DEFAULT_ONLY:
            if value not in (None, False, [], {}):
                raise InvalidRequestError(f"{key}: not supported by this server")
            continue
        if key not in GENERATE_FIELDS:
            raise InvalidRequestError(f"unknown field {key!r}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequestError("stream: expected true or false")
    text_flag = body.get("return_text_in_logprobs", False)
    if not isinstance(text_flag, bool):
        raise InvalidRequestError("return_text_in_logprobs: expected true or false")
    priority = body.get("priority")
    if priority is not None:
        check_int(priority, "priority")
    _check_text(body.get("text"), max_text_chars)
    _check_n(body.get("sampling_params"), max_n)
    return {
        "prompt": body.get("text"),
        "input_ids": body.get("input_ids"),
        "sampling_params": body.get("sampling_params"),
        "return_logprob": body.get("return_logprob", False),
        "logprob_start_len": body.get("logprob_start_len"),
        "rid": body.get("rid"),
        "stream": stream,
        "return_text_in_logprobs": text_flag,
        "priority": priority,
        "top_logprobs_num": body.get("top_logprobs_num"),
        "token_ids_logprob": body.get("token_ids_logprob"),
        "segments": body.get("segments"),
        "ttft_slo_ms": body.get("ttft_slo_ms"),
    }


def _check_text(text: Any, max_chars: int | None) -> None:
    if max_chars is None or text is None:
        return
    for item in text if isinstance(text, list) else [text]:
        if isinstance(item, str) and len(item) > max_chars:
            raise InvalidRequestError(
                f"text: {len(item)} characters; this server tokenises at most {max_chars}"
            )


def _check_n(params: Any, max_n: int | None) -> None:
    if max_n is None:
        return
    for item in params if isinstance(params, list) else [params]:
        if not isinstance(item, dict):
            continue
        n = item.get("n")
        if isinstance(n, int) and not isinstance(n, bool) and n > max_n:
            raise InvalidRequestError(
                f"sampling_params.n: {_show(n)} exceeds this server's limit of {max_n}"
            )


def require(body: dict[str, Any], key: str, kind: type | tuple[type, ...], endpoint: str) -> Any:
    if key not in body:
        raise InvalidRequestError(f"{endpoint}: missing field {key!r}")
    value = body[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise InvalidRequestError(f"{endpoint}: {key!r} has the wrong type")
    return value
