"""SGLang's NGRAM external-corpus routes over `engine.spec` (serving/spec/state.py).

Bodies and answers as SGLang 0.5.x http_server.py has them:
  POST /add_external_corpus {corpus_id?, file_path? | documents? | token_chunks?}
       -> {success, corpus_id, message, loaded_token_count}
  POST /remove_external_corpus {corpus_id} -> {success, message}
  GET  /list_external_corpora -> {success, corpus_token_counts: {id: tokens}, message}
Failures answer 400 with `success: false` and a message naming the field; with speculation off
every route answers SGLang's "Ngram speculative decoding is not enabled.". Corpus semantics
(sources, separators, the token budget): serving/spec/corpus.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from rollout_accel.serving.spec.corpus import CorpusError
from rollout_accel.serving.spec.state import SpecState, spec_of

ADD_FIELDS = {"corpus_id", "file_path", "documents", "token_chunks"}
NOT_ENABLED = "Ngram speculative decoding is not enabled."

router = APIRouter()


def _fail(message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"success": False, **extra, "message": message}, status_code=400)


async def _body(request: Request) -> dict[str, Any] | str:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return f"the body is not valid JSON ({exc})"
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    return body


def _spec(request: Request) -> SpecState | None:
    return spec_of(request.app.state.engine)


@router.post("/add_external_corpus")
async def add_external_corpus(request: Request) -> JSONResponse:
    spec = _spec(request)
    if spec is None:
        return _fail(NOT_ENABLED, corpus_id="", loaded_token_count=0)
    body = await _body(request)
    if isinstance(body, str):
        return _fail(f"add_external_corpus: {body}", corpus_id="", loaded_token_count=0)
    unknown = sorted(set(body) - ADD_FIELDS)
    if unknown:
        return _fail(
            f"add_external_corpus: unknown field {unknown[0]!r}", corpus_id="", loaded_token_count=0
        )
    try:
        added = await asyncio.to_thread(
            spec.registry.add,
            body.get("corpus_id"),
            documents=body.get("documents"),
            token_chunks=body.get("token_chunks"),
            file_path=body.get("file_path"),
            encode=spec.encode,
        )
    except CorpusError as exc:
        return _fail(str(exc), corpus_id="", loaded_token_count=0)
    return JSONResponse(
        {
            "success": True,
            "corpus_id": added.corpus_id,
            "message": added.message,
            "loaded_token_count": added.loaded_token_count,
        }
    )


@router.post("/remove_external_corpus")
async def remove_external_corpus(request: Request) -> JSONResponse:
    spec = _spec(request)
    if spec is None:
        return _fail(NOT_ENABLED)
    body = await _body(request)
    if isinstance(body, str):
        return _fail(f"remove_external_corpus: {body}")
    corpus_id = body.get("corpus_id")
    if not corpus_id:
        return _fail("corpus_id is required.")
    if not isinstance(corpus_id, str):
        return _fail("corpus_id: expected a string")
    return JSONResponse({"success": True, "message": spec.registry.remove(corpus_id)})


@router.get("/list_external_corpora")
async def list_external_corpora(request: Request) -> JSONResponse:
    spec = _spec(request)
    if spec is None:
        return _fail(NOT_ENABLED, corpus_token_counts={})
    return JSONResponse(
        {"success": True, "corpus_token_counts": spec.registry.list(), "message": ""}
    )
