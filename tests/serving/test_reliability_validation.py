"""Poison bodies get a 400 naming the field, while unrelated requests keep running (issue 20: 1, 4,
5). Real server on loopback."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from rollout_accel.serving.server import ServerThread
from rollout_accel.serving.server.settings import ServerSettings

BYSTANDER = {"max_new_tokens": 48, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def server():
    settings = ServerSettings(max_text_chars=2_000_000)
    with ServerThread(model_path="tiny-qwen3", max_running_requests=64, settings=settings) as srv:
        yield srv


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def _raw(body: bytes | dict) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


POISON = [
    ({"input_ids": [1, 2, 3], "priority": "high"}, "priority"),
    ({"input_ids": [1, 2, 3], "priority": True}, "priority"),
    ({"input_ids": [1, 2, 3], "priority": 2**70}, "priority"),
    ({"input_ids": [1, 2, 3], "sampling_params": {"sampling_seed": 2**63}}, "sampling_seed"),
    ({"input_ids": [1, 2, 3], "sampling_params": {"sampling_seed": -(2**63) - 1}}, "sampling_seed"),
    (
        {"input_ids": [1, 2, 3], "sampling_params": {"sampling_seed": 2**63 - 1, "n": 2}},
        "sampling_seed",
    ),
    ({"input_ids": [1], "sampling_params": {"top_k": 10**30, "top_p": 0.5}}, "top_k"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": 10**40}}, "max_new_tokens"),
    ({"input_ids": [1], "sampling_params": {"n": 100_000}}, "sampling_params.n"),
    (b'{"input_ids": [1], "priority": ' + b"7" * 5000 + b"}", "integer"),
    (b'{"input_ids": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested"),
    (b'{"input_ids": [1], "sampling_params": {"stop": ' + b"[" * 40 + b"]" * 40 + b"}}", "stop"),
    ({"text": "x" * 2_000_001}, "text"),
]


@pytest.mark.parametrize(("body", "needle"), POISON, ids=[n for _, n in POISON])
def test_poison_body_is_400_naming_the_field(http, body, needle) -> None:
    r = http.post("/generate", content=_raw(body), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


def test_poison_bodies_do_not_hurt_bystanders(server, http) -> None:
    """16 normal requests in flight while every poison body arrives: all 16 finish by length,
    none is aborted, and the KV pool is empty afterwards."""
    results: list[dict] = []

    def bystander(i: int) -> None:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            r = c.post(
                "/generate",
                json={"input_ids": [i + 1, i + 2, i + 3, i + 4], "sampling_params": BYSTANDER},
            )
            results.append(r.json())

    threads = [threading.Thread(target=bystander, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    for body, _ in POISON:
        r = http.post("/generate", content=_raw(body), headers={"content-type": "application/json"})
        assert r.status_code == 400
    for t in threads:
        t.join(120)
    assert len(results) == 16
    reasons = [r["meta_info"]["finish_reason"] for r in results]
    assert all(reason["type"] == "length" for reason in reasons), reasons
    assert all(r["meta_info"]["completion_tokens"] == 48 for r in results)
    loads = http.get("/v1/loads").json()["loads"][0]
    assert loads["num_running_reqs"] == 0
    assert loads["num_used_tokens"] == loads["num_cached_tokens"]


def test_big_text_is_tokenised_off_the_event_loop(http, server) -> None:
    """A ~1.8 MB text takes seconds to tokenise; /health must answer meanwhile."""
    done = threading.Event()
    status: list[int] = []

    def big() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            r = c.post(
                "/generate",
                json={"text": "hello world " * 150_000, "sampling_params": {"max_new_tokens": 1}},
            )
            status.append(r.status_code)
        done.set()

    start = time.perf_counter()
    thread = threading.Thread(target=big)
    thread.start()
    worst = 0.0
    time.sleep(0.1)
    while not done.is_set():
        t0 = time.perf_counter()
        assert http.get("/health").status_code == 200
        worst = max(worst, time.perf_counter() - t0)
        time.sleep(0.02)
    thread.join()
    took = time.perf_counter() - start
    assert status == [400]  # longer than the context: refused after tokenising
    assert took > 1.0, "the text tokenised too fast to show anything; make it longer"
    # On the event loop, one /health call would wait for the whole tokenisation.
    assert worst < took / 3, f"/health waited {worst:.2f} s while tokenising ({took:.1f} s)"


def test_request_schemas_are_published(http) -> None:
    spec = http.get("/openapi.json").json()
    body = spec["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]
    generate = spec["components"]["schemas"][body["schema"]["$ref"].rsplit("/", 1)[1]]
    assert {"input_ids", "text", "sampling_params", "priority", "rid"} <= set(
        generate["properties"]
    )
    sampling = spec["components"]["schemas"]["SamplingParamsBody"]["properties"]
    assert {"n", "sampling_seed", "max_new_tokens", "temperature"} <= set(sampling)
    for path in ("/update_weights_from_tensor", "/init_weights_update_group", "/abort_request"):
        assert "requestBody" in spec["paths"][path]["post"], path
