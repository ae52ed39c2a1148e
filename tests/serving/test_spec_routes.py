"""SGLang's external-corpus routes over real HTTP on loopback."""

from __future__ import annotations

import json

import httpx
import pytest

from rollout_accel.serving.engine import Engine
from rollout_accel.serving.server import ServerThread
from rollout_accel.serving.spec import SpecConfig, attach_spec


@pytest.fixture(scope="module")
def server():
    engine = Engine("tiny-qwen3", max_running_requests=8)
    attach_spec(engine, SpecConfig(algorithm="NGRAM", max_corpus_tokens=64))
    with ServerThread(engine=engine) as srv:
        yield srv
    engine.shutdown()


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def test_add_list_remove(server, http, tmp_path) -> None:
    r = http.post("/add_external_corpus", json={"corpus_id": "p1", "token_chunks": [[1, 2, 3]]})
    assert r.status_code == 200
    assert r.json() == {
        "success": True,
        "corpus_id": "p1",
        "message": "Loaded corpus 'p1' with 3 tokens.",
        "loaded_token_count": 3,
    }
    text = "hello hello"
    r = http.post("/add_external_corpus", json={"documents": [text]})
    body = r.json()
    expected = len(server.engine.tokenizer.encode(text))
    assert r.status_code == 200 and body["loaded_token_count"] == expected
    generated = body["corpus_id"]
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps([4, 5]) + "\n")
    r = http.post("/add_external_corpus", json={"corpus_id": "f", "file_path": str(path)})
    assert r.status_code == 200 and r.json()["loaded_token_count"] == 2
    r = http.get("/list_external_corpora")
    assert r.status_code == 200
    assert r.json() == {
        "success": True,
        "corpus_token_counts": {"p1": 3, generated: expected, "f": 2},
        "message": "",
    }
    for cid in ("p1", generated, "f"):
        r = http.post("/remove_external_corpus", json={"corpus_id": cid})
        assert r.status_code == 200 and r.json() == {
            "success": True,
            "message": f"Removed corpus '{cid}'.",
        }
    assert http.get("/list_external_corpora").json()["corpus_token_counts"] == {}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"corpus_id": "x", "token_chunks": [[1, -5]]}, "token_chunks[0][1]"),
        ({"corpus_id": "x", "token_chunks": [[10**9]]}, "outside the vocabulary"),
        ({"corpus_id": "x"}, "exactly one of"),
        ({"corpus_id": "x", "texts": ["a"]}, "unknown field 'texts'"),
        ({"corpus_id": 5, "token_chunks": [[1]]}, "corpus_id"),
        ({"corpus_id": "x", "documents": [1]}, "documents[0]"),
        ({"corpus_id": "x", "token_chunks": [list(range(65))]}, "budget of 64 tokens"),
        ({"corpus_id": "x", "file_path": "/nope.jsonl"}, "does not exist"),
        ([1, 2], "JSON object"),
    ],
)
def test_add_bad_bodies_are_400_naming_the_field(http, body, needle: str) -> None:
    r = http.post("/add_external_corpus", json=body)
    assert r.status_code == 400
    out = r.json()
    assert out["success"] is False and needle in out["message"], out
    assert out["corpus_id"] == "" and out["loaded_token_count"] == 0
    assert "x" not in http.get("/list_external_corpora").json()["corpus_token_counts"]


def test_duplicate_and_remove_errors(http) -> None:
    assert http.post(
        "/add_external_corpus", json={"corpus_id": "d", "token_chunks": [[1]]}
    ).is_success
    r = http.post("/add_external_corpus", json={"corpus_id": "d", "token_chunks": [[2]]})
    assert r.status_code == 400 and "already exists" in r.json()["message"]
    r = http.post("/remove_external_corpus", json={})
    assert r.status_code == 400 and r.json() == {
        "success": False,
        "message": "corpus_id is required.",
    }
    r = http.post(
        "/remove_external_corpus",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["message"]
    assert http.post("/remove_external_corpus", json={"corpus_id": "d"}).is_success
    # The server keeps serving generations.
    r = http.post("/generate", json={"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}})
    assert r.status_code == 200 and len(r.json()["output_ids"]) == 2


def test_routes_refuse_when_speculation_is_off() -> None:
    msg = "Ngram speculative decoding is not enabled."
    with (
        ServerThread(model_path="tiny-qwen3", max_running_requests=4) as srv,
        httpx.Client(base_url=srv.url, timeout=60) as http,
    ):
        r = http.post("/add_external_corpus", json={"token_chunks": [[1]]})
        assert r.status_code == 400 and r.json()["message"] == msg
        r = http.post("/remove_external_corpus", json={"corpus_id": "a"})
        assert r.status_code == 400 and r.json()["message"] == msg
        r = http.get("/list_external_corpora")
        assert r.status_code == 400 and r.json()["success"] is False
