"""SGLang's HTTP API over an in-process Engine (FastAPI, as SGLang itself uses).

Routes, bodies, status codes and response shapes follow SGLang 0.5.x's http_server.py so slime,
SGLang's clients and our own controller talk to this server unchanged. Control calls that block on
the engine thread run in worker threads so the event loop keeps serving generations.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from rollout_accel.serving.engine import Engine, InvalidRequestError, RequestNotFoundError
from rollout_accel.serving.server.corpus_routes import router as corpus_router
from rollout_accel.serving.server.openai_api import register_openai_routes
from rollout_accel.serving.server.protocol import (
    check_fields,
    deserialize_named_tensors,
    parse_generate,
    parse_json_object,
    require,
)

_UNAUTHENTICATED_PREFIXES = ("/health", "/metrics")


def error_response(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "code": status}}, status_code=status)


def _weights_response(ok: bool, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(
        {"success": ok, "message": message, **extra}, status_code=200 if ok else 400
    )


async def sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """SGLang's stream framing: `data: {json}` events, then `data: [DONE]`."""
    try:
        async for chunk in chunks:
            yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
    except InvalidRequestError as exc:
        yield b"data: " + json.dumps({"error": {"message": str(exc)}}).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"


def build_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="rollout-accel (SGLang protocol)", version="0.1.0")
    app.state.engine = engine

    @app.exception_handler(InvalidRequestError)
    async def _invalid(_: Request, exc: InvalidRequestError) -> JSONResponse:
        return error_response(str(exc), 400)

    @app.exception_handler(RequestNotFoundError)
    async def _missing(_: Request, exc: RequestNotFoundError) -> JSONResponse:
        return error_response(str(exc), 404)

    if api_key:

        @app.middleware("http")
        async def _authenticate(request: Request, call_next):
            path = request.url.path
            if request.method == "OPTIONS" or path.startswith(_UNAUTHENTICATED_PREFIXES):
                return await call_next(request)
            if request.headers.get("Authorization") != f"Bearer {api_key}":
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
            return await call_next(request)

    async def body_of(request: Request, endpoint: str) -> dict[str, Any]:
        return parse_json_object(await request.body(), endpoint)

    # -- generation -------------------------------------------------------------------------
    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request) -> Response:
        kwargs = parse_generate(await body_of(request, "generate"))
        if kwargs["stream"]:
            requests, batched = engine.make_requests(**kwargs)
            if batched:
                raise InvalidRequestError("stream: supported for a single prompt only")
            return StreamingResponse(
                sse(engine.stream_request(requests[0])), media_type="text/event-stream"
            )
        out = await engine.async_generate(**kwargs)
        return JSONResponse(out)

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        body = await body_of(request, "abort_request")
        check_fields(
            body, {"rid", "abort_all", "abort_message", "finished_reason"}, "abort_request"
        )
        abort_all = body.get("abort_all", False)
        if not isinstance(abort_all, bool):
            raise InvalidRequestError("abort_request: 'abort_all' expected true or false")
        rid = body.get("rid") or None
        if rid is not None and not isinstance(rid, str):
            raise InvalidRequestError("abort_request: 'rid' expected a string")
        await asyncio.to_thread(engine.abort, rid, abort_all)
        return Response(status_code=200)

    @app.post("/pause_generation")
    async def pause_generation(request: Request) -> JSONResponse:
        body = await body_of(request, "pause_generation")
        check_fields(body, {"mode"}, "pause_generation")
        await asyncio.to_thread(engine.pause_generation, body.get("mode", "abort"))
        return JSONResponse({"message": "Generation paused successfully.", "status": "ok"})

    @app.post("/continue_generation")
    async def continue_generation(request: Request) -> JSONResponse:
        await body_of(request, "continue_generation")
        await asyncio.to_thread(engine.continue_generation)
        return JSONResponse({"message": "Generation continued successfully.", "status": "ok"})

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        ok = await asyncio.to_thread(engine.flush_cache)
        if ok:
            return Response("Cache flushed.\n", status_code=200)
        return Response("Cache not flushed: requests are running or waiting.\n", status_code=400)

    # -- health and info --------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate() -> Response:
        loads = await asyncio.to_thread(engine.get_loads)
        if loads["num_running_reqs"] or loads["num_waiting_reqs"] or engine.paused:
            return Response(status_code=200)  # busy means alive, as SGLang treats it
        try:
            await asyncio.wait_for(
                engine.async_generate(
                    input_ids=[0],
                    sampling_params={"max_new_tokens": 1, "temperature": 0},
                    rid=f"HEALTH_CHECK_{time.time()}",
                ),
                timeout=20,
            )
        except (TimeoutError, Exception):
            return Response(status_code=503)
        return Response(status_code=200)

    async def server_info() -> JSONResponse:
        loads = await asyncio.to_thread(engine.get_loads)
        return JSONResponse({**engine.server_info(), "internal_states": [loads]})

    app.add_api_route("/server_info", server_info, methods=["GET"])
    app.add_api_route("/get_server_info", server_info, methods=["GET"])

    async def model_info() -> JSONResponse:
        return JSONResponse(
            {
                "model_path": engine.config.model_path,
                "tokenizer_path": engine.config.model_path,
                "is_generation": True,
                "weight_version": engine.get_weight_version(),
            }
        )

    app.add_api_route("/model_info", model_info, methods=["GET"])
    app.add_api_route("/get_model_info", model_info, methods=["GET"])

    @app.get("/v1/loads")
    async def v1_loads() -> JSONResponse:
        loads = await asyncio.to_thread(engine.get_loads)
        total = max(loads["max_total_num_tokens"], 1)
        return JSONResponse(
            {
                "timestamp": datetime.now(UTC).isoformat(),
                "version": "rollout-accel-0.1.0",
                "accelerator": str(engine.device),
                "num_accelerators": 1,
                "loads": [
                    {
                        "dp_rank": 0,
                        **loads,
                        "max_running_requests": engine.config.max_running_requests,
                        "token_usage": loads["num_used_tokens"] / total,
                    }
                ],
            }
        )

    @app.get("/get_load")
    async def get_load() -> JSONResponse:
        loads = await asyncio.to_thread(engine.get_loads)
        return JSONResponse([{"dp_rank": 0, **loads}])

    @app.get("/get_weight_version")
    async def get_weight_version() -> JSONResponse:
        return JSONResponse({"weight_version": engine.get_weight_version()})

    # -- weights ----------------------------------------------------------------------------
    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request) -> JSONResponse:
        body = await body_of(request, "update_weights_from_disk")
        check_fields(
            body,
            {
                "model_path",
                "load_format",
                "weight_version",
                "flush_cache",
                "abort_all_requests",
                "token_step",
                "is_async",
                "keep_pause",
                "recapture_cuda_graph",
                "torch_empty_cache",
            },
            "update_weights_from_disk",
        )
        path = require(body, "model_path", str, "update_weights_from_disk")
        ok, message = await asyncio.to_thread(
            engine.update_weights_from_disk,
            path,
            body.get("weight_version"),
            body.get("flush_cache", True),
        )
        return _weights_response(ok, message, num_paused_requests=0)

    @app.post("/update_weights_from_tensor")
    async def update_weights_from_tensor(request: Request) -> JSONResponse:
        body = await body_of(request, "update_weights_from_tensor")
        check_fields(
            body,
            {
                "serialized_named_tensors",
                "load_format",
                "flush_cache",
                "abort_all_requests",
                "weight_version",
            },
            "update_weights_from_tensor",
        )
        payloads = require(body, "serialized_named_tensors", list, "update_weights_from_tensor")
        if body.get("load_format") not in (None, "direct"):
            raise InvalidRequestError(f"load_format: {body['load_format']!r} is not supported")
        if not payloads:
            raise InvalidRequestError("serialized_named_tensors: empty")
        # One payload per tensor-parallel rank; this engine is rank 0.
        named = deserialize_named_tensors(payloads[0])
        ok, message = await asyncio.to_thread(
            engine.update_weights_from_tensor,
            named,
            body.get("flush_cache", True),
            body.get("weight_version"),
        )
        return _weights_response(ok, message)

    @app.post("/init_weights_update_group")
    async def init_weights_update_group(request: Request) -> JSONResponse:
        body = await body_of(request, "init_weights_update_group")
        name = "init_weights_update_group"
        check_fields(
            body,
            {"master_address", "master_port", "rank_offset", "world_size", "group_name", "backend"},
            name,
        )
        ok, message = await asyncio.to_thread(
            engine.init_weights_update_group,
            require(body, "master_address", str, name),
            require(body, "master_port", int, name),
            require(body, "rank_offset", int, name),
            require(body, "world_size", int, name),
            body.get("group_name", "weight_update_group"),
            body.get("backend"),
        )
        return _weights_response(ok, message)

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(request: Request) -> JSONResponse:
        body = await body_of(request, "update_weights_from_distributed")
        name = "update_weights_from_distributed"
        check_fields(
            body,
            {
                "names",
                "dtypes",
                "shapes",
                "group_name",
                "flush_cache",
                "abort_all_requests",
                "weight_version",
                "load_format",
            },
            name,
        )
        ok, message = await asyncio.to_thread(
            engine.update_weights_from_distributed,
            require(body, "names", list, name),
            require(body, "dtypes", list, name),
            require(body, "shapes", list, name),
            body.get("group_name", "weight_update_group"),
            body.get("flush_cache", True),
            body.get("weight_version"),
        )
        return _weights_response(ok, message)

    @app.post("/destroy_weights_update_group")
    async def destroy_weights_update_group(request: Request) -> JSONResponse:
        body = await body_of(request, "destroy_weights_update_group")
        check_fields(body, {"group_name"}, "destroy_weights_update_group")
        ok, message = await asyncio.to_thread(
            engine.destroy_weights_update_group, body.get("group_name", "weight_update_group")
        )
        return _weights_response(ok, message)

    async def _memory(request: Request, release: bool) -> Response:
        name = "release_memory_occupation" if release else "resume_memory_occupation"
        body = await body_of(request, name)
        check_fields(body, {"tags"}, name)
        tags = body.get("tags")
        if tags is not None and (
            not isinstance(tags, list) or not all(isinstance(t, str) for t in tags)
        ):
            raise InvalidRequestError(f"{name}: 'tags' expected a list of strings")
        call = engine.release_memory_occupation if release else engine.resume_memory_occupation
        ok, message = await asyncio.to_thread(call, tags)
        if not ok:
            return error_response(message, 400)
        return Response(status_code=200)

    @app.api_route("/release_memory_occupation", methods=["GET", "POST"])
    async def release_memory_occupation(request: Request) -> Response:
        return await _memory(request, True)

    @app.api_route("/resume_memory_occupation", methods=["GET", "POST"])
    async def resume_memory_occupation(request: Request) -> Response:
        return await _memory(request, False)

    register_openai_routes(app, engine)
    app.include_router(corpus_router)  # /add_external_corpus, /remove_..., /list_external_corpora
    return app
