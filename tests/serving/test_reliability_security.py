"""No code runs from a web page, no state changes from a GET, no DNS rebinding (issue 20: 7).
Real server on loopback, real pickle payloads."""

from __future__ import annotations

import base64
import json
import os
import pickle
from pathlib import Path

import httpx
import pytest
import torch

from rollout_accel.serving.server import ServerThread
from rollout_accel.serving.server.settings import ServerSettings


class _WritesAFile:
    """A pickle payload that, if unpickled by plain pickle, creates `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _payload(path: Path) -> dict:
    blob = base64.b64encode(pickle.dumps([("lm_head.weight", _WritesAFile(path))])).decode()
    return {"serialized_named_tensors": [blob]}


@pytest.fixture(scope="module")
def server():
    with ServerThread(model_path="tiny-qwen3") as srv:
        yield srv


def test_cross_origin_text_plain_pickle_post_runs_nothing(server, tmp_path) -> None:
    marker = tmp_path / "pwned"
    # What a browser sends for fetch(url, {method: "POST", body, mode: "no-cors"}).
    r = httpx.post(
        f"{server.url}/update_weights_from_tensor",
        content=json.dumps(_payload(marker)),
        headers={
            "content-type": "text/plain;charset=UTF-8",
            "origin": "http://attacker.example",
            "sec-fetch-site": "cross-site",
        },
    )
    assert r.status_code == 403 and "Origin" in r.json()["error"]["message"]
    assert not marker.exists()
    # Same-site browser page on another local port: still refused.
    r = httpx.post(
        f"{server.url}/update_weights_from_tensor",
        content=json.dumps(_payload(marker)),
        headers={"content-type": "text/plain", "origin": "http://127.0.0.1:8080"},
    )
    assert r.status_code == 403
    # No Origin at all but not JSON: 415 before anything is parsed.
    r = httpx.post(
        f"{server.url}/update_weights_from_tensor",
        content=json.dumps(_payload(marker)),
        headers={"content-type": "text/plain"},
    )
    assert r.status_code == 415 and "Content-Type" in r.json()["error"]["message"]
    assert not marker.exists()


def test_trusted_client_pickle_is_restricted_to_tensors(server, tmp_path) -> None:
    marker = tmp_path / "pwned"
    r = httpx.post(f"{server.url}/update_weights_from_tensor", json=_payload(marker))
    assert r.status_code == 400
    assert "serialized_named_tensors" in r.json()["error"]["message"]
    assert not marker.exists()
    # A real tensor payload still loads (SGLang's wire shape).
    weight = server.engine.model.lm_head.weight.detach().clone()
    blob = base64.b64encode(pickle.dumps([("lm_head.weight", weight)])).decode()
    r = httpx.post(
        f"{server.url}/update_weights_from_tensor",
        json={"serialized_named_tensors": [blob], "weight_version": "same"},
    )
    assert r.status_code == 200 and r.json()["success"], r.text


def test_unsafe_pickle_is_opt_in(tmp_path) -> None:
    marker = tmp_path / "ran"
    with ServerThread(model_path="tiny-qwen3", settings=ServerSettings(unsafe_pickle=True)) as srv:
        httpx.post(f"{srv.url}/update_weights_from_tensor", json=_payload(marker))
    assert marker.exists()  # the flag really switches the allow-list off


def test_state_changes_need_post(server) -> None:
    assert httpx.get(f"{server.url}/release_memory_occupation").status_code == 405
    assert httpx.get(f"{server.url}/resume_memory_occupation").status_code == 405
    # The engine still generates: nothing was released.
    r = httpx.post(
        f"{server.url}/generate",
        json={"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}},
    )
    assert r.status_code == 200 and r.json()["meta_info"]["finish_reason"]["type"] == "length"


def test_cross_site_get_and_dns_rebinding_are_refused(server) -> None:
    r = httpx.get(f"{server.url}/flush_cache", headers={"sec-fetch-site": "cross-site"})
    assert r.status_code == 403 and "Sec-Fetch-Site" in r.json()["error"]["message"]
    r = httpx.get(
        f"{server.url}/server_info", headers={"host": f"rebind.attacker.example:{server.port}"}
    )
    assert r.status_code == 403 and "Host" in r.json()["error"]["message"]
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", f"[::1]:{server.port}"):
        assert httpx.get(f"{server.url}/health", headers={"host": host}).status_code == 200
    # The server's own /docs page (same origin) may call it.
    r = httpx.get(
        f"{server.url}/get_model_info",
        headers={"origin": f"http://127.0.0.1:{server.port}", "sec-fetch-site": "same-origin"},
    )
    assert r.status_code == 200


def test_flags_allow_named_origins_and_hosts() -> None:
    settings = ServerSettings(
        allowed_origins=("http://dashboard.internal:8080",), allowed_hosts=("engine.internal",)
    )
    with ServerThread(model_path="tiny-qwen3", settings=settings) as srv:
        ok = {"origin": "http://dashboard.internal:8080", "sec-fetch-site": "cross-site"}
        assert httpx.get(f"{srv.url}/get_model_info", headers=ok).status_code == 200
        bad = {"origin": "http://other.internal:8080"}
        assert httpx.get(f"{srv.url}/get_model_info", headers=bad).status_code == 403
        host = {"host": f"engine.internal:{srv.port}"}
        assert httpx.get(f"{srv.url}/get_model_info", headers=host).status_code == 200


def test_api_key_still_guards_with_the_new_middleware() -> None:
    with ServerThread(model_path="tiny-qwen3", api_key="k") as srv:
        assert httpx.post(f"{srv.url}/flush_cache").status_code == 401
        auth = {"authorization": "Bearer k"}
        assert httpx.post(f"{srv.url}/flush_cache", headers=auth).status_code == 200
        assert httpx.get(f"{srv.url}/health").status_code == 200


def test_plain_pickle_of_cpu_tensors_round_trips() -> None:
    from rollout_accel.serving.server.weight_payload import (
        deserialize_named_tensors,
        serialize_named_tensors,
    )

    named = [("a", torch.randn(3, 4)), ("b", torch.arange(6, dtype=torch.int64)[2:])]
    back = deserialize_named_tensors(serialize_named_tensors(named))
    assert [n for n, _ in back] == ["a", "b"]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(named, back, strict=True))
    evil = base64.b64encode(pickle.dumps([("a", _Evil())])).decode()
    with pytest.raises(ValueError, match="not allowed"):
        deserialize_named_tensors(evil)


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())
