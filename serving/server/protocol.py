"""Request bodies of the SGLang HTTP API, checked field by field (unknown fields are refused).

We parse JSON ourselves instead of binding pydantic models so every refusal is a 400 whose message
names the field, the same for every endpoint, and so SGLang's optional fields that we accept but
ignore are listed in one place.
"""

from __future__ import annotations

import base64
import json
import pickle
from typing import Any

import torch
import torch.multiprocessing

from rollout_accel.serving.engine.errors import InvalidRequestError

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
    "log_metrics",
    "background",
    "extra_key",
    "no_logs",
    "custom_labels",
    "return_routed_experts",
    "return_entropy",
}


def parse_json_object(raw: bytes, endpoint: str) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"{endpoint}: the body is not valid JSON ({exc})") from exc
    if not isinstance(body, dict):
        raise InvalidRequestError(f"{endpoint}: the body must be a JSON object")
    return body


def check_fields(body: dict[str, Any], allowed: set[str], endpoint: str) -> None:
    for key in body:
        if key not in allowed:
            raise InvalidRequestError(f"{endpoint}: unknown field {key!r}")


def parse_generate(body: dict[str, Any]) -> dict[str, Any]:
    """Validates a /generate body; returns Engine.make_requests keyword arguments."""
    for key, value in body.items():
        if key in GENERATE_DEFAULT_ONLY:
            if value not in (None, False, [], {}):
                raise InvalidRequestError(f"{key}: not supported by this server")
            continue
        if key not in GENERATE_FIELDS:
            raise InvalidRequestError(f"unknown field {key!r}")
    if body.get("top_logprobs_num") not in (None, 0):
        raise InvalidRequestError("top_logprobs_num: top-k logprobs are not supported")
    if body.get("token_ids_logprob") is not None:
        raise InvalidRequestError("token_ids_logprob: not supported")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequestError("stream: expected true or false")
    text_flag = body.get("return_text_in_logprobs", False)
    if not isinstance(text_flag, bool):
        raise InvalidRequestError("return_text_in_logprobs: expected true or false")
    return {
        "prompt": body.get("text"),
        "input_ids": body.get("input_ids"),
        "sampling_params": body.get("sampling_params"),
        "return_logprob": body.get("return_logprob", False),
        "logprob_start_len": body.get("logprob_start_len"),
        "rid": body.get("rid"),
        "stream": stream,
        "return_text_in_logprobs": text_flag,
        "priority": body.get("priority"),
        "ttft_slo_ms": body.get("ttft_slo_ms"),
    }


def require(body: dict[str, Any], key: str, kind: type | tuple[type, ...], endpoint: str) -> Any:
    if key not in body:
        raise InvalidRequestError(f"{endpoint}: missing field {key!r}")
    value = body[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise InvalidRequestError(f"{endpoint}: {key!r} has the wrong type")
    return value


def serialize_named_tensors(named_tensors: list[tuple[str, torch.Tensor]]) -> str:
    """The client side of `/update_weights_from_tensor`: pickled (name, tensor) pairs, base64.

    SGLang's trainers send the same shape (torch's multiprocessing pickler; CUDA tensors travel as
    IPC handles to a server on the same GPU)."""
    return base64.b64encode(pickle.dumps(list(named_tensors))).decode("ascii")


def deserialize_named_tensors(payload: str | bytes) -> list[tuple[str, torch.Tensor]]:
    """Inverse of `serialize_named_tensors`. The payload is pickle: accept it only from a trusted
    trainer (set --api-key when the port is reachable by others)."""
    try:
        raw = base64.b64decode(payload) if isinstance(payload, str) else payload
        named = pickle.loads(raw)
    except Exception as exc:
        raise InvalidRequestError(f"serialized_named_tensors: cannot decode ({exc})") from exc
    if isinstance(named, dict):
        named = list(named.items())
    if not isinstance(named, list) or not all(
        isinstance(item, tuple | list)
        and len(item) == 2
        and isinstance(item[0], str)
        and isinstance(item[1], torch.Tensor)
        for item in named
    ):
        raise InvalidRequestError(
            "serialized_named_tensors: expected a list of (name, tensor) pairs"
        )
    return [(name, tensor) for name, tensor in named]
