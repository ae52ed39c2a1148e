"""Request-body schemas published in `/openapi.json` (for clients, docs and fuzzers).

These models document the bodies; they do not validate them. Validation stays in `protocol.py`
and `SamplingParams` so every refusal is a 400 naming the field. Field bounds here mirror those
checks (signed 64-bit integers, `n` up to the server's --max-n).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

INT64 = {"ge": -(2**63), "le": 2**63 - 1}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingParamsBody(_Body):
    max_new_tokens: int | None = Field(128, ge=0, le=2**63 - 1)
    min_new_tokens: int | None = Field(0, ge=0, le=2**63 - 1)
    temperature: float | None = Field(1.0, ge=0)
    top_p: float | None = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(-1, ge=-1, le=2**63 - 1)
    min_p: float | None = Field(0.0, ge=0, le=1)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(1.0, gt=0, le=2)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = False
    skip_special_tokens: bool | None = True
    no_stop_trim: bool | None = False
    n: int | None = Field(1, ge=1, le=256)
    sampling_seed: int | None = Field(None, **INT64)
    custom_params: dict[str, Any] | None = None


class GenerateBody(_Body):
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: SamplingParamsBody | list[SamplingParamsBody] | None = None
    rid: str | list[str] | None = None
    return_logprob: bool | list[bool] | None = False
    logprob_start_len: int | list[int] | None = None
    return_text_in_logprobs: bool | None = False
    stream: bool | None = False
    priority: int | None = Field(None, **INT64)


class AbortBody(_Body):
    rid: str | None = None
    abort_all: bool | None = False
    abort_message: str | None = None
    finished_reason: Any = None


class PauseBody(_Body):
    mode: str | None = Field("abort", pattern="^(abort|retract|in_place)$")


class MemoryBody(_Body):
    tags: list[str] | None = None


class UpdateFromDiskBody(_Body):
    model_path: str
    load_format: str | None = None
    weight_version: str | None = None
    flush_cache: bool | None = True
    abort_all_requests: bool | None = False


class UpdateFromTensorBody(_Body):
    serialized_named_tensors: list[str]
    load_format: str | None = None
    flush_cache: bool | None = True
    abort_all_requests: bool | None = False
    weight_version: str | None = None


class InitGroupBody(_Body):
    master_address: str
    master_port: int = Field(ge=1, le=65535)
    rank_offset: int = Field(ge=0)
    world_size: int = Field(ge=1)
    group_name: str | None = "weight_update_group"
    backend: str | None = None


class UpdateFromDistributedBody(_Body):
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str | None = "weight_update_group"
    flush_cache: bool | None = True
    abort_all_requests: bool | None = False
    weight_version: str | None = None
    load_format: str | None = None


class GroupNameBody(_Body):
    group_name: str | None = "weight_update_group"


BODIES: dict[str, type[BaseModel]] = {
    "/generate": GenerateBody,
    "/abort_request": AbortBody,
    "/pause_generation": PauseBody,
    "/release_memory_occupation": MemoryBody,
    "/resume_memory_occupation": MemoryBody,
    "/update_weights_from_disk": UpdateFromDiskBody,
    "/update_weights_from_tensor": UpdateFromTensorBody,
    "/init_weights_update_group": InitGroupBody,
    "/update_weights_from_distributed": UpdateFromDistributedBody,
    "/destroy_weights_update_group": GroupNameBody,
}


def publish(openapi: dict[str, Any]) -> dict[str, Any]:
    """Adds the bodies above to an OpenAPI document (routes parse raw JSON, so FastAPI cannot
    infer them): each body under components/schemas, referenced by its route's POST."""
    _, defs = models_json_schema(
        [(model, "validation") for model in set(BODIES.values())],
        ref_template="#/components/schemas/{model}",
    )
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(defs.get("$defs", {}))
    for path, model in BODIES.items():
        operation = openapi.get("paths", {}).get(path, {}).get("post")
        if operation is None:
            continue
        operation["requestBody"] = {
            "required": any(f.is_required() for f in model.model_fields.values()),
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
            },
        }
    return openapi
