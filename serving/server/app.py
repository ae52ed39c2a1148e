"""SGLang's HTTP API over an in-process Engine (FastAPI, as SGLang itself uses).

Routes, bodies, status codes and response shapes follow SGLang 0.5.x's http_server.py so slime,
SGLang's clients and our own controller talk to this server unchanged. Control calls that block on
the engine thread run in worker threads so the event loop keeps serving generations.

Reliability rules kept here: every body is validated before it reaches the engine (a bad one is a
400 naming the field); tokenising runs in a worker thread; a client that hangs up has its requests
aborted; `/health_generate` is answered by a real one-token generation. Who may call at all is
decided by `security.RequestGuard`, in front of every route.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from rollout_accel.serving.engine import (
    Engine,
    EngineDeadError,
    InvalidRequestError,
    RequestNotFoundError,
)
from rollout_accel.serving.server import schemas
from rollout_accel.serving.server.corpus_routes import router as corpus_router
from rollout_accel.serving.server.dispatch import (
    run_requests,
    stream_until_disconnect,
    wait_for_disconnect,
)
from rollout_accel.serving.server.openai_api import register_openai_routes
from rollout_accel.serving.server.protocol import (
    check_fields,
    parse_generate,
    parse_json_object,
    require,
)
from rollout_accel.serving.server.security import RequestGuard
from rollout_accel.serving.server.settings import ServerSettings
from rollout_accel.serving.server.slime_routes import slime_router
from rollout_accel.serving.server.weight_payload import deserialize_named_tensors

# The health probe jumps the waiting queue: it measures whether the engine makes progress, not
# how long the queue is.
_HEALTH_PRIORITY = 2**62


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


def build_app(
    engine: Engine,
    api_key: str | None = None,
    settings: ServerSettings | None = None,
    bound_host: str = "127.0.0.1",
) -> FastAPI:
    settings = settings or ServerSettings()
    app = FastAPI(title="rollout-accel (SGLang protocol)", version="0.1.0")
    app.state.engine = engine
    app.state.settings = settings
    engine.receiver.timeout_s = settings.weight_group_timeout_s
    app.add_middleware(RequestGuard, settings=settings, bound_host=bound_host, api_key=api_key)

    @app.exception_handler(InvalidRequestError)
    async def _invalid(_: Request, exc: InvalidRequestError) -> JSONResponse:
        return error_response(str(exc), 400)

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return error_response(str(exc), 500)

    @app.exception_handler(RequestNotFoundError)
    async def _missing(_: Request, exc: RequestNotFoundError) -> JSONResponse:
        return error_response(str(exc), 404)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = schemas.publish(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    async def body_of(request: Request, endpoint: str) -> dict[str, Any]:
        return parse_json_object(await request.body(), endpoint, settings.max_json_depth)

    # -- generation -------------------------------------------------------------------------
    @app.put("/generate", include_in_schema=False)
    @app.post("/generate")
    async def generate(request: Request) -> Response:
        kwargs = parse_generate(
            await body_of(request, "generate"), settings.max_n, settings.max_text_chars
        )
        # Tokenising (and validating long id lists) is CPU work: keep it off the event loop.
        requests, batched = await asyncio.to_thread(engine.make_requests, **kwargs)
        if kwargs["stream"]:
            if batched:
                raise InvalidRequestError("stream: supported for a single prompt only")
            chunks = sse(engine.stream_request(requests[0]))
            return StreamingResponse(
                stream_until_disconnect(chunks, request.receive), media_type="text/event-stream"
            )
        outs = await run_requests(engine, requests, wait_for_disconnect(request.receive))
        if outs is None:  # the client hung up; its requests were aborted
            return Response(status_code=499)
        return JSONResponse(outs if batched else outs[0])

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

    # GET stays (SGLang's scripts use it); a flush loses no data and cross-site GETs are refused
    # by the guard (Sec-Fetch-Site).
    @app.get("/flush_cache", include_in_schema=False)
    @app.post("/flush_cache")
    async def flush_cache() -> Response:
        ok = await asyncio.to_thread(engine.flush_cache)
        if ok:
            return Response("Cache flushed.\n", status_code=200)
        return Response("Cache not flushed: requests are running or waiting.\n", status_code=400)

    # -- health and info --------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if not engine.alive:
            return error_response("the engine thread failed or was shut down", 503)
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate() -> Response:
        """200 only when one real token was generated within the timeout; 503 (with the reason)
        when the engine is paused, wedged, released or answers with an abort or error."""
        if not engine.alive:
            return error_response("the engine thread failed or was shut down", 503)
        if engine.paused:
            return error_response("generation is paused", 503)
        if engine.memory_released:
            return error_response("weights or KV cache are released", 503)
        requests, _ = engine.make_requests(
            input_ids=[0],
            sampling_params={"max_new_tokens": 1, "temperature": 0, "ignore_eos": True},
            rid=f"HEALTH_CHECK_{uuid.uuid4().hex}",
            priority=_HEALTH_PRIORITY,
        )
        timeout = settings.health_generate_timeout_s
        try:
            outs = await run_requests(engine, requests, timeout=timeout)
        except Exception as exc:  # the engine refused or failed the probe
            return error_response(f"health probe failed: {exc}", 503)
        if outs is None:
            return error_response(f"no token within {timeout:g} s", 503)
        reason = outs[0]["meta_info"].get("finish_reason") or {}
        if reason.get("type") not in ("length", "stop") or not outs[0].get("output_ids"):
            return error_response(f"health probe did not generate: {reason}", 503)
        return Response(status_code=200)

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
        named = deserialize_named_tensors(payloads[0], unsafe=settings.unsafe_pickle)
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
        return JSONResponse(None)  # SGLang answers `null`; slime parses the body as JSON

    # POST only: a GET is what any web page can send (an <img> tag) and must not change state.
    @app.post("/release_memory_occupation")
    async def release_memory_occupation(request: Request) -> Response:
        return await _memory(request, True)

    @app.post("/resume_memory_occupation")
    async def resume_memory_occupation(request: Request) -> Response:
        return await _memory(request, False)

    register_openai_routes(app, engine)
    app.include_router(slime_router(engine))  # /server_info, weights checker, profiler, ...
    app.include_router(corpus_router)  # /add_external_corpus, /remove_..., /list_external_corpora
    return app
