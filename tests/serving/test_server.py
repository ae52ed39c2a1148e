"""The SGLang-protocol server, over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from rollout_accel.serving.client import EngineClient, ServerError
from rollout_accel.serving.engine import Engine
from rollout_accel.serving.models import load_model
from rollout_accel.serving.server import ServerThread, free_port

GREEDY = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}


@pytest.fixture(scope="module")
def server():
    with ServerThread(model_path="tiny-qwen3", max_running_requests=256) as srv:
        yield srv


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def test_generate_single_batched_and_text(server, http) -> None:
    ref = server.engine.generate(input_ids=[5, 6, 7], sampling_params=GREEDY, return_logprob=True)
    r = http.post(
        "/generate",
        json={"input_ids": [5, 6, 7], "sampling_params": GREEDY, "return_logprob": True},
    )
    assert r.status_code == 200
    out = r.json()
    assert out["output_ids"] == ref["output_ids"]
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 16}
    assert meta["prompt_tokens"] == 3 and meta["completion_tokens"] == 16
    assert {"id", "cached_tokens", "weight_version", "e2e_latency"} <= set(meta)
    assert all(len(t) == 3 and t[2] is None for t in meta["output_token_logprobs"])
    r = http.post("/generate", json={"input_ids": [[5, 6, 7], [8, 9]], "sampling_params": GREEDY})
    assert isinstance(r.json(), list) and len(r.json()) == 2
    r = http.post(
        "/generate", json={"text": "hello", "sampling_params": {"max_new_tokens": 3}, "rid": "t1"}
    )
    assert r.json()["meta_info"]["id"] == "t1" and r.json()["meta_info"]["prompt_tokens"] == 5


def test_256_concurrent_generates(server) -> None:
    prompts = [[(i * 7 + j) % 500 for j in range(3 + i % 13)] for i in range(256)]
    distinct = {tuple(p) for p in prompts}
    refs = {
        p: server.engine.generate(input_ids=list(p), sampling_params=GREEDY)["output_ids"]
        for p in list(distinct)[:20]
    }

    async def run() -> list[dict]:
        async with EngineClient(server.url) as client:
            return await asyncio.gather(
                *(client.generate({"input_ids": p, "sampling_params": GREEDY}) for p in prompts)
            )

    outs = asyncio.run(run())
    assert len(outs) == 256
    assert all(o["meta_info"]["completion_tokens"] == 16 for o in outs)
    for prompt, out in zip(prompts, outs, strict=True):
        if tuple(prompt) in refs:
            assert out["output_ids"] == refs[tuple(prompt)]


def test_stream_and_abort_mid_stream(server, http) -> None:
    payload = {
        "input_ids": [1, 2, 3, 4],
        "sampling_params": {"temperature": 0, "max_new_tokens": 3000, "ignore_eos": True},
        "return_logprob": True,
        "rid": "stream-abort",
        "stream": True,
    }
    chunks = []
    with http.stream("POST", "/generate", json=payload) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        for line in lines:
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            chunks.append(json.loads(line[6:]))
            if len(chunks) == 5:
                assert (
                    httpx.post(
                        f"{server.url}/abort_request", json={"rid": "stream-abort"}
                    ).status_code
                    == 200
                )
    final = chunks[-1]
    assert final["meta_info"]["finish_reason"]["type"] == "abort"
    assert 5 <= len(final["output_ids"]) < 3000
    assert len(final["meta_info"]["output_token_logprobs"]) == len(final["output_ids"])
    ref = server.engine.generate(
        input_ids=[1, 2, 3, 4],
        sampling_params={**GREEDY, "max_new_tokens": len(final["output_ids"])},
    )
    assert final["output_ids"] == ref["output_ids"]


def test_abort_all_returns_partial_to_waiting_client(server) -> None:
    result: dict = {}

    def call() -> None:
        result["r"] = httpx.post(
            f"{server.url}/generate",
            json={
                "input_ids": [3, 3],
                "sampling_params": {"max_new_tokens": 5000, "ignore_eos": True},
                "return_logprob": True,
            },
            timeout=120,
        )

    worker = threading.Thread(target=call)
    worker.start()
    while server.engine.get_loads()["num_running_reqs"] == 0:
        time.sleep(0.01)
    time.sleep(0.1)
    assert httpx.post(f"{server.url}/abort_request", json={"abort_all": True}).status_code == 200
    worker.join(timeout=60)
    out = result["r"].json()
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(out["output_ids"]) == len(out["meta_info"]["output_token_logprobs"]) > 0
    loads = httpx.get(f"{server.url}/v1/loads").json()["loads"][0]
    assert loads["num_running_reqs"] == 0 and loads["num_waiting_reqs"] == 0


def test_pause_continue_and_control_endpoints(server, http) -> None:
    result: dict = {}
    worker = threading.Thread(
        target=lambda: result.setdefault(
            "r",
            httpx.post(
                f"{server.url}/generate",
                json={
                    "input_ids": [4, 4],
                    "sampling_params": {"max_new_tokens": 200, "ignore_eos": True},
                },
                timeout=120,
            ),
        )
    )
    worker.start()
    while server.engine.get_loads()["num_running_reqs"] == 0:
        time.sleep(0.01)
    assert http.post("/pause_generation", json={"mode": "in_place"}).json()["status"] == "ok"
    time.sleep(0.2)
    assert "r" not in result
    assert http.post("/pause_generation", json={"mode": "bogus"}).status_code == 400
    assert http.post("/continue_generation", json={}).status_code == 200
    worker.join(timeout=60)
    assert result["r"].json()["meta_info"]["completion_tokens"] == 200

    assert http.get("/health").status_code == 200
    assert http.get("/health_generate").status_code == 200
    for path in ("/server_info", "/get_server_info"):
        info = http.get(path).json()
        assert info["model_path"] == "tiny-qwen3" and "internal_states" in info
    assert http.get("/get_weight_version").json() == {"weight_version": "default"}
    assert http.get("/model_info").json()["is_generation"] is True
    assert http.post("/flush_cache").status_code == 200
    assert http.get("/v1/models").json()["data"][0]["id"] == "tiny-qwen3"
    assert http.post("/release_memory_occupation", json={"tags": ["kv_cache"]}).status_code == 200
    assert http.post("/resume_memory_occupation", json={"tags": ["kv_cache"]}).status_code == 200
    assert http.post("/release_memory_occupation", json={"tags": ["nope"]}).status_code == 400
    r = http.post("/generate", json={"input_ids": [5, 6, 7], "sampling_params": GREEDY})
    assert r.status_code == 200


def test_weight_updates_over_http(tmp_path) -> None:
    prompts = [[1, 2, 3], [7, 8, 9, 10]]
    with Engine("tiny-qwen3", seed=1) as ref_engine:
        expected = [
            o["output_ids"] for o in ref_engine.generate(input_ids=prompts, sampling_params=GREEDY)
        ]
    with (
        ServerThread(model_path="tiny-qwen3") as srv,
        httpx.Client(base_url=srv.url, timeout=120) as http,
    ):
        before = [
            o["output_ids"]
            for o in http.post(
                "/generate", json={"input_ids": prompts, "sampling_params": GREEDY}
            ).json()
        ]
        assert before != expected
        # A separate process pushes seed-1 weights with init_weights_update_group +
        # update_weights_from_distributed over gloo.
        pusher = Path(__file__).with_name("weight_pusher.py")
        proc = subprocess.run(
            [sys.executable, str(pusher), srv.url, str(free_port())],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        after = [
            o["output_ids"]
            for o in http.post(
                "/generate", json={"input_ids": prompts, "sampling_params": GREEDY}
            ).json()
        ]
        assert after == expected
        assert http.get("/get_weight_version").json()["weight_version"] == "pushed-1"

        # Back to seed 0 through /update_weights_from_tensor (the client's serializer).
        seed0 = load_model("tiny-qwen3", seed=0).model

        async def push() -> dict:
            async with EngineClient(srv.url) as client:
                return await client.update_weights_from_tensor(
                    list(seed0.named_parameters()), weight_version="t0"
                )

        assert asyncio.run(push())["success"]
        again = [
            o["output_ids"]
            for o in http.post(
                "/generate", json={"input_ids": prompts, "sampling_params": GREEDY}
            ).json()
        ]
        assert again == before

        # From disk.
        from rollout_accel.serving.models import materialize_preset

        path = materialize_preset("tiny-qwen3", tmp_path / "s1", seed=1)
        r = http.post(
            "/update_weights_from_disk", json={"model_path": str(path), "weight_version": "d1"}
        )
        assert r.status_code == 200 and r.json()["success"]
        disk = [
            o["output_ids"]
            for o in http.post(
                "/generate", json={"input_ids": prompts, "sampling_params": GREEDY}
            ).json()
        ]
        assert disk == expected

        # Bad weights: 400 naming the problem; outputs unchanged.
        import torch

        async def bad(named) -> None:
            async with EngineClient(srv.url) as client:
                await client.update_weights_from_tensor(named)

        with pytest.raises(ServerError) as err:
            asyncio.run(bad([("model.norm.weight", torch.ones(7))]))
        assert err.value.status == 400 and "shape" in err.value.message
        with pytest.raises(ServerError) as err:
            asyncio.run(bad([("model.not_a_param", torch.ones(7))]))
        assert "model.not_a_param" in err.value.message
        r = http.post("/update_weights_from_disk", json={"model_path": str(tmp_path / "missing")})
        assert r.status_code == 400 and not r.json()["success"]
        r = http.post(
            "/update_weights_from_distributed",
            json={"names": ["a"], "dtypes": ["float32"], "shapes": [[1]], "group_name": "none"},
        )
        assert r.status_code == 400 and "none" in r.json()["message"]
        still = [
            o["output_ids"]
            for o in http.post(
                "/generate", json={"input_ids": prompts, "sampling_params": GREEDY}
            ).json()
        ]
        assert still == expected


def test_api_key_enforced() -> None:
    with ServerThread(model_path="tiny-qwen3", api_key="sekret") as srv:
        assert httpx.get(f"{srv.url}/health").status_code == 200
        r = httpx.post(
            f"{srv.url}/generate", json={"input_ids": [1], "sampling_params": {"max_new_tokens": 1}}
        )
        assert r.status_code == 401
        r = httpx.post(
            f"{srv.url}/generate",
            json={"input_ids": [1], "sampling_params": {"max_new_tokens": 1}},
            headers={"Authorization": "Bearer wrong"},
        )
        assert r.status_code == 401
        r = httpx.post(
            f"{srv.url}/generate",
            json={"input_ids": [1], "sampling_params": {"max_new_tokens": 1}},
            headers={"Authorization": "Bearer sekret"},
        )
        assert r.status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "JSON"),
        (b"[1, 2]", 400, "object"),
        (json.dumps({"input_ids": [1], "surprise": 1}).encode(), 400, "surprise"),
        (json.dumps({"input_ids": [1], "sampling_params": {"top_p": 2}}).encode(), 400, "top_p"),
        (
            json.dumps({"input_ids": [1], "sampling_params": {"max_new_tokens": -3}}).encode(),
            400,
            "max_new_tokens",
        ),
        (
            json.dumps({"input_ids": [1], "sampling_params": {"temprature": 1}}).encode(),
            400,
            "temprature",
        ),
        (json.dumps({"input_ids": [1] * 5000}).encode(), 400, "context length"),
        (json.dumps({"input_ids": [1, 999999]}).encode(), 400, "vocabulary"),
        (json.dumps({"input_ids": [1], "image_data": "x"}).encode(), 400, "image_data"),
    ],
)
def test_bad_generate_requests(server, http, body, status, needle) -> None:
    r = http.post("/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    assert needle in r.json()["error"]["message"]
    assert (
        http.post(
            "/generate", json={"input_ids": [1], "sampling_params": {"max_new_tokens": 1}}
        ).status_code
        == 200
    )


def test_unknown_rid_is_404_and_bad_control_bodies(http) -> None:
    r = http.post("/abort_request", json={"rid": "no-such"})
    assert r.status_code == 404 and "no-such" in r.json()["error"]["message"]
    assert http.post("/abort_request", json={"rid": 5}).status_code == 400
    assert (
        http.post("/init_weights_update_group", json={"master_address": "127.0.0.1"}).status_code
        == 400
    )
    assert (
        http.post(
            "/update_weights_from_tensor", json={"serialized_named_tensors": ["!!"]}
        ).status_code
        == 400
    )


def test_openai_endpoints(server, http) -> None:
    r = http.post(
        "/v1/completions",
        json={
            "model": "tiny-qwen3",
            "prompt": "abc",
            "max_tokens": 5,
            "temperature": 0,
            "logprobs": 1,
        },
    )
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion"
    assert (
        body["usage"]["completion_tokens"] <= 5 and body["choices"][0]["logprobs"]["token_logprobs"]
    )
    r = http.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": 2},
    )
    body = r.json()
    assert body["object"] == "chat.completion" and len(body["choices"]) == 2
    assert body["choices"][0]["message"]["role"] == "assistant"
    pieces = []
    with http.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 6,
            "stream": True,
            "temperature": 0,
            "ignore_eos": True,
        },
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                pieces.append(json.loads(line[6:]))
    assert pieces[0]["choices"][0]["delta"]["role"] == "assistant"
    assert pieces[-1]["choices"][0]["finish_reason"] == "length"
    streamed = "".join(p["choices"][0]["delta"]["content"] for p in pieces)
    r = http.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 6,
            "temperature": 0,
            "ignore_eos": True,
        },
    )
    assert streamed == r.json()["choices"][0]["message"]["content"]
    assert http.post("/v1/chat/completions", json={"messages": "hi"}).status_code == 400
    assert http.post("/v1/completions", json={"prompt": "a", "wat": 1}).status_code == 400
