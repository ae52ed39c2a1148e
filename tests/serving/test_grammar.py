"""Structured output through xgrammar: SGLang's sampling_params json_schema / regex / ebnf on the
engine and over /generate; constrained and free rows share batches."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from rollout_accel.serving.engine import Engine, InvalidRequestError
from rollout_accel.serving.engine.grammar import ANY_JSON
from rollout_accel.serving.server import ServerThread

pytest.importorskip("xgrammar")  # the optional `structured` extra (in dev, so CI runs this)

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 9},
        "tag": {"type": "string", "enum": ["a", "bc"]},
    },
    "required": ["ok", "n", "tag"],
    "additionalProperties": False,
}


def test_json_schema_outputs_validate(engine: Engine) -> None:
    outs = engine.generate(
        input_ids=[[5, 6, 7]] * 4,
        sampling_params={
            "temperature": 1.0,
            "max_new_tokens": 48,
            "json_schema": json.dumps(SCHEMA),
        },
    )
    for out in outs:
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out["text"]
        value = json.loads(out["text"])
        assert set(value) == {"ok", "n", "tag"} and isinstance(value["ok"], bool)
        assert 0 <= value["n"] <= 9 and value["tag"] in ("a", "bc")


def test_regex_ebnf_and_any_json(engine: Engine) -> None:
    out = engine.generate(
        input_ids=[1, 2, 3],
        sampling_params={"temperature": 1.0, "max_new_tokens": 16, "regex": r"[0-9]{3}-(x|yz)"},
    )
    assert re.fullmatch(r"[0-9]{3}-(x|yz)", out["text"]), out["text"]
    ebnf = 'root ::= "(" item ("," item)* ")"\nitem ::= [a-c]'
    out = engine.generate(
        input_ids=[4, 5],
        sampling_params={"temperature": 1.0, "max_new_tokens": 24, "ebnf": ebnf},
    )
    if out["meta_info"]["finish_reason"]["type"] == "stop":
        assert re.fullmatch(r"\([a-c](,[a-c])*\)", out["text"]), out["text"]
    else:
        assert re.fullmatch(r"\([a-c](,[a-c])*,?", out["text"]), out["text"]
    outs = engine.generate(
        input_ids=[[5, 6, 7], [9, 9], [3], [8, 1]],
        sampling_params={"temperature": 1.0, "max_new_tokens": 64, "json_schema": ANY_JSON},
    )
    finished = [o for o in outs if o["meta_info"]["finish_reason"]["type"] == "stop"]
    assert finished
    for out in finished:
        json.loads(out["text"])


def test_constrained_and_free_rows_share_a_batch(engine: Engine) -> None:
    """A free request batched with constrained ones gets the same tokens as alone; logprob
    options on a constrained row stay finite (masked tokens report the float minimum)."""
    free = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    alone = engine.generate(input_ids=[7, 8, 9], sampling_params=free)
    outs = engine.generate(
        input_ids=[[7, 8, 9], [7, 8, 9], [2, 3]],
        sampling_params=[free, {"temperature": 0, "max_new_tokens": 12, "regex": "(ab)+"}, free],
        return_logprob=True,
        top_logprobs_num=5,
    )
    assert outs[0]["output_ids"] == alone["output_ids"]
    assert re.fullmatch(r"(ab)*a?b?", outs[1]["text"]), outs[1]["text"]
    for row in outs[1]["meta_info"]["output_top_logprobs"]:
        assert all(lp > float("-inf") for lp, _, _ in row)
        assert row[0][0] > -1e30  # the allowed token leads


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"json_schema": "{not json"}, "json_schema"),
        ({"json_schema": 5}, "json_schema"),
        ({"regex": "(open"}, "regex"),
        ({"ebnf": "root ::= missing_rule"}, "ebnf"),
        ({"regex": "a", "json_schema": "{}"}, "regex"),
        ({"regex": "a", "ignore_eos": True}, "ignore_eos"),
        ({"structural_tag": "{}"}, "structural_tag"),
    ],
)
def test_bad_grammars_name_the_field(engine: Engine, params: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError, match=field):
        engine.generate(input_ids=[1, 2], sampling_params=params)


def test_generate_route() -> None:
    with ServerThread(model_path="tiny-qwen3", max_running_requests=8) as srv:
        r = httpx.post(
            f"{srv.url}/generate",
            json={
                "text": "pick",
                "sampling_params": {"max_new_tokens": 48, "json_schema": json.dumps(SCHEMA)},
            },
            timeout=60,
        )
        assert r.status_code == 200 and set(json.loads(r.json()["text"])) == {"ok", "n", "tag"}
        r = httpx.post(
            f"{srv.url}/generate",
            json={"text": "x", "sampling_params": {"regex": "("}},
            timeout=60,
        )
        assert r.status_code == 400 and "regex" in r.json()["error"]["message"]
