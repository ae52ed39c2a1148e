"""Fuzzed bodies mixed into normal traffic: no 5xx, no bystander hurt, no KV leaked (issue 20).

Bodies are built from the request schemas the server publishes in `/openapi.json`: a valid
/generate body with fields (known and unknown, top-level and sampling) replaced by arbitrary JSON
(huge integers, NaN, deep nesting, wrong types), plus raw malformed bodies. Meanwhile 64 clients
keep sending normal requests; each must finish by length with every token. Example count:
ROLLOUT_FUZZ_EXAMPLES (default 1000).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import aiohttp
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rollout_accel.serving.server import ServerThread

EXAMPLES = int(os.environ.get("ROLLOUT_FUZZ_EXAMPLES", "1000"))
BYSTANDERS = 64
NORMAL = {"max_new_tokens": 24, "ignore_eos": True, "temperature": 0.7}


@pytest.fixture(scope="module")
def server():
    with ServerThread(model_path="tiny-qwen3", max_running_requests=128) as srv:
        yield srv


def _schema_fields(spec: dict, name: str) -> list[str]:
    return sorted(spec["components"]["schemas"][name]["properties"])


def _json_values() -> st.SearchStrategy:
    leaves = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**300])
        | st.floats(allow_nan=True, allow_infinity=True)
        | st.text(max_size=12)
    )
    return st.recursive(
        leaves,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
        ),
        max_leaves=8,
    )


def _raw_bodies() -> st.SearchStrategy:
    return st.sampled_from(
        [
            b"{",
            b"[]",
            b"null",
            b'"text"',
            b'{"input_ids": [1], "priority": ' + b"9" * 5000 + b"}",
            b'{"input_ids": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            b'{"input_ids": [1], "sampling_params": {"stop": ' + b"[" * 50 + b"]" * 50 + b"}}",
            b'{"input_ids": [1], "sampling_params": {"temperature": NaN}}',
            b'{"input_ids": [1], "sampling_params": {"top_p": Infinity}}',
            b"\xff\xfe\x00garbage",
        ]
    ) | st.binary(max_size=64)


def _bodies(spec: dict) -> st.SearchStrategy:
    top = _schema_fields(spec, "GenerateBody")
    sampling = _schema_fields(spec, "SamplingParamsBody")
    names = st.sampled_from(top) | st.text(min_size=1, max_size=6)
    param_names = st.sampled_from(sampling) | st.text(min_size=1, max_size=6)

    @st.composite
    def mutated(draw) -> bytes:
        body: dict = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 4}}
        for _ in range(draw(st.integers(1, 3))):
            if draw(st.booleans()):
                body[draw(names)] = draw(_json_values())
            else:
                params = body.get("sampling_params")
                if not isinstance(params, dict):
                    params = body["sampling_params"] = {}
                params[draw(param_names)] = draw(_json_values())
        return json.dumps(body, allow_nan=True).encode()

    return mutated() | _raw_bodies()


class _Bystanders:
    """64 clients sending normal requests in a loop until stopped; records every outcome."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.outcomes: list[tuple[int, dict | str]] = []
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as session:

            async def client(i: int) -> None:
                step = 0
                while not self.stop.is_set():
                    step += 1
                    body = {"input_ids": [i + 1, step % 50 + 1, 7], "sampling_params": NORMAL}
                    async with session.post(f"{self.url}/generate", json=body) as r:
                        text = await r.text()
                        self.outcomes.append((r.status, json.loads(text) if r.ok else text))

            await asyncio.gather(*(client(i) for i in range(BYSTANDERS)))


def test_fuzzed_bodies_hurt_no_bystander_and_leak_no_kv(server) -> None:
    http = httpx.Client(base_url=server.url, timeout=30)
    spec = http.get("/openapi.json").json()
    answers: dict[int, int] = {}
    bystanders = _Bystanders(server.url)
    bystanders.thread.start()
    while len(bystanders.outcomes) < 8:  # normal traffic is flowing
        time.sleep(0.05)
    start = time.perf_counter()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(body=_bodies(spec), route=st.sampled_from(["/generate"] * 6 + ["/abort_request"]))
    def fuzz(body: bytes, route: str) -> None:
        if route == "/abort_request" and b"abort_all" in body:
            return  # aborting everything is a legitimate request that does hurt bystanders
        try:
            r = http.post(route, content=body, headers={"content-type": "application/json"})
            status = r.status_code
        except httpx.ReadTimeout:
            status = -1  # a valid but long request; our hang-up aborts it on the server
        answers[status] = answers.get(status, 0) + 1
        assert status < 500, (status, body[:300], r.text[:300])

    try:
        fuzz()
    finally:
        bystanders.stop.set()
        bystanders.thread.join(120)
    took = time.perf_counter() - start
    bad = [o for o in bystanders.outcomes if o[0] != 200]
    assert not bad, bad[:3]
    reasons = {o[1]["meta_info"]["finish_reason"]["type"] for o in bystanders.outcomes}
    assert reasons == {"length"}
    assert all(o[1]["meta_info"]["completion_tokens"] == 24 for o in bystanders.outcomes)
    assert sum(answers.values()) >= EXAMPLES // 2 and answers.get(400, 0) > 0, answers
    # Every KV slot is back: idle, then the prefix cache flushed, nothing is held.
    deadline = time.time() + 30
    while True:
        loads = http.get("/v1/loads").json()["loads"][0]
        if loads["num_running_reqs"] + loads["num_waiting_reqs"] == 0:
            break
        assert time.time() < deadline, loads
        time.sleep(0.1)
    assert http.post("/flush_cache").status_code == 200
    loads = http.get("/v1/loads").json()["loads"][0]
    assert loads["num_used_tokens"] == 0, loads
    print(f"fuzz: {answers} in {took:.1f} s; {len(bystanders.outcomes)} bystander requests")
