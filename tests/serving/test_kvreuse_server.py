"""KV reuse end to end: the `segments` field over HTTP on loopback (reuse reported in meta_info
and /v1/loads, bad markings refused with a 400 naming the field), and in the engine: r = 1 is
token-identical to a plain prefill, and the chunk store shares the engine's slot accounting."""

from __future__ import annotations

import random

import httpx
import pytest

from rollout_accel.serving.engine import Engine
from rollout_accel.serving.server import ServerThread

GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}


def _prompts(seed: int = 0):
    rng = random.Random(seed)
    doc_a = [rng.randrange(3, 500) for _ in range(48)]
    doc_b = [rng.randrange(3, 500) for _ in range(40)]
    head1, head2 = (
        [rng.randrange(3, 500) for _ in range(9)],
        [rng.randrange(3, 500) for _ in range(5)],
    )
    q1, q2 = [rng.randrange(3, 500) for _ in range(6)], [rng.randrange(3, 500) for _ in range(7)]
    first = (head1 + doc_a + doc_b + q1, [[9, 57], [57, 97]])
    second = (head2 + doc_b + doc_a + q2, [[5, 45], [45, 93]])
    return first, second


@pytest.fixture(scope="module")
def server():
    with ServerThread(model_path="tiny-qwen3", max_running_requests=16) as srv:
        yield srv


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def test_segments_over_http_reuse_chunks(http) -> None:
    (ids1, seg1), (ids2, seg2) = _prompts()
    r1 = http.post(
        "/generate", json={"input_ids": ids1, "segments": seg1, "sampling_params": GREEDY}
    )
    assert r1.status_code == 200, r1.text
    info1 = r1.json()["meta_info"]["kvreuse"]
    assert info1["reused_tokens"] == 0 and len(r1.json()["output_ids"]) == 12
    r2 = http.post(
        "/generate", json={"input_ids": ids2, "segments": seg2, "sampling_params": GREEDY}
    )
    assert r2.status_code == 200, r2.text
    info2 = r2.json()["meta_info"]["kvreuse"]
    assert info2["reused_tokens"] == 88  # both documents, at new positions and order
    assert info2["recomputed_reused_tokens"] == 14  # ceil(0.15 * 88)
    assert info2["computed_tokens"] < len(ids2)
    loads = http.get("/v1/loads").json()["loads"][0]["kvreuse"]
    assert loads["reused_tokens"] >= 88 and loads["chunk_tokens"] >= 88 and loads["fallbacks"] == 0
    # batched: one segment list per prompt
    rb = http.post(
        "/generate",
        json={"input_ids": [ids1, ids2], "segments": [seg1, None], "sampling_params": GREEDY},
    )
    assert rb.status_code == 200 and len(rb.json()) == 2
    assert "kvreuse" in rb.json()[0]["meta_info"] and "kvreuse" not in rb.json()[1]["meta_info"]


@pytest.mark.parametrize(
    ("segments", "needle"),
    [
        ("0-5", "segments: expected a list"),
        ([[0, 500]], r"segments[0]: [0, 500) is outside the prompt's 20 tokens"),
        ([[4, 2]], "segments[0]: end must be greater than start"),
        ([[0, 5], [3, 8]], "segments[1]: segments must be ascending and non-overlapping"),
        ([[0, "x"]], "segments[0]: start and end must be integers"),
    ],
)
def test_bad_segments_get_400_naming_the_field(http, segments, needle) -> None:
    r = http.post(
        "/generate",
        json={"input_ids": list(range(3, 23)), "segments": segments, "sampling_params": GREEDY},
    )
    assert r.status_code == 400, r.text
    assert needle in r.text
    ok = http.post("/generate", json={"input_ids": [5, 6, 7], "sampling_params": GREEDY})
    assert ok.status_code == 200  # still serving


def test_ratio_one_in_the_engine_is_token_identical_to_plain_prefill() -> None:
    (ids1, seg1), (ids2, seg2) = _prompts(1)
    with (
        Engine("tiny-qwen3", kv_reuse_recompute_ratio=1.0) as eng,
        Engine("tiny-qwen3", kv_reuse=False) as plain,
    ):
        for ids, seg in ((ids1, seg1), (ids2, seg2)):
            out = eng.generate(input_ids=ids, segments=seg, sampling_params=GREEDY)
            ref = plain.generate(input_ids=ids, sampling_params=GREEDY)
            assert out["output_ids"] == ref["output_ids"]
        assert out["meta_info"]["kvreuse"]["reused_tokens"] == 88
        loads = eng.get_loads()
        # every slot owned once: used = radix + chunks (nothing running)
        assert (
            loads["num_used_tokens"]
            == loads["num_cached_tokens"] + loads["kvreuse"]["chunk_tokens"]
        )
        assert eng.flush_cache()
        assert eng.get_loads()["num_used_tokens"] == 0


def test_separator_marks_segments_of_text_prompts() -> None:
    from rollout_accel.serving.kvreuse.segments import split_on_separator

    doc_a = "the first shared document, long enough to be stored as a chunk."
    doc_b = "a second document that every agent reads again in another order."
    greedy = {"temperature": 0, "max_new_tokens": 4}
    prompts = (f"agent one ### {doc_a} ### {doc_b}", f"agent two! ### {doc_b} ### {doc_a}")
    with Engine("tiny-qwen3", kv_reuse_separator=" ### ") as eng:
        first = eng.generate(prompt=prompts[0], sampling_params=greedy)
        second = eng.generate(prompt=prompts[1], sampling_params=greedy)
        assert first["meta_info"]["kvreuse"]["reused_tokens"] == 0
        ids = eng.tokenizer.encode(prompts[1])
        docs = split_on_separator(ids, eng.tokenizer.encode(" ### "))[1:]
        assert len(docs) == 2
        assert second["meta_info"]["kvreuse"]["reused_tokens"] == sum(e - s for s, e in docs)


def test_a_failing_reuse_prefill_falls_back_to_the_normal_path(monkeypatch) -> None:
    """The engine isolates the failed step; the request is retried alone by full prefill."""
    from rollout_accel.serving.kvreuse import engine_hook

    def boom(*args, **kwargs):
        raise RuntimeError("injected blend failure")

    (ids1, seg1), _ = _prompts(2)
    greedy = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}
    with Engine("tiny-qwen3", kv_reuse=False) as plain:
        ref = plain.generate(input_ids=ids1, sampling_params=greedy)
    monkeypatch.setattr(engine_hook, "blend_prefill", boom)
    with Engine("tiny-qwen3") as eng:
        out = eng.generate(input_ids=ids1, segments=seg1, sampling_params=greedy)
        assert out["output_ids"] == ref["output_ids"] and "kvreuse" not in out["meta_info"]
        fallbacks = eng.get_loads()["kvreuse"]["fallback_reasons"]
        assert fallbacks == {"reuse prefill failed (RuntimeError)": 1}
        assert eng.generate(input_ids=[5, 6, 7], sampling_params=greedy)["output_ids"]
