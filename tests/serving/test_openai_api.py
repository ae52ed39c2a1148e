"""The OpenAI routes driven by the official `openai` client over loopback: completions and chat,
streaming and not, usage, logprobs in each route's shape, structured output; refused fields
answer 400 naming them."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from rollout_accel.serving.server import ServerThread

MODEL = "tiny-qwen3"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def server():
    with ServerThread(model_path=MODEL, max_running_requests=32) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _joined(tokens: list[str]) -> str:
    """The text the legacy tokens spell: a fragment of a multi-byte character comes as one latin-1
    character per raw byte (the preset's other pieces are ASCII)."""
    raw = b"".join(t.encode("utf-8") if t.isascii() else t.encode("latin-1") for t in tokens)
    return raw.decode("utf-8", "replace")


def _dense_top(server, ids: list[int]) -> torch.Tensor:
    engine = server.engine
    with torch.inference_mode():
        logits = engine.model(torch.tensor([ids], device=engine.device))[0].float()
    return torch.log_softmax(logits, dim=-1).cpu()


def test_completions_logprobs_echo_and_usage(server, client) -> None:
    tok = server.engine.tokenizer
    prompt = "hello big cat"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, logprobs=3, **GREEDY)
    choice = r.choices[0]
    assert r.usage.prompt_tokens == len(tok.encode(prompt)) and r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert _joined(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and max(top.values()) == pytest.approx(value, abs=1e-5)
        assert top[token] == pytest.approx(value, abs=1e-5)
    # The values are the model's: re-score prompt + output with a dense forward.
    ids = tok.encode(prompt) + tok.encode(choice.text)
    ref = _dense_top(server, ids)
    first = len(tok.encode(prompt))
    assert lp.token_logprobs[0] == pytest.approx(ref[first - 1].max().item(), abs=1e-4)
    # echo: the prompt comes back in the text, and with logprobs its tokens lead (first None).
    e = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=5, logprobs=2, echo=True, **GREEDY
    ).choices[0]
    assert e.text == prompt + choice.text
    n_prompt = len(tok.encode(prompt))
    assert e.logprobs.token_logprobs[0] is None and e.logprobs.top_logprobs[0] is None
    assert len(e.logprobs.tokens) == n_prompt + 5 and _joined(e.logprobs.tokens) == e.text
    assert e.logprobs.token_logprobs[n_prompt:] == pytest.approx(lp.token_logprobs, abs=1e-5)
    assert e.logprobs.text_offset[n_prompt] == len(prompt)


def test_completions_streaming_with_usage(client) -> None:
    args = dict(model=MODEL, prompt="a big cat", max_tokens=6, logprobs=2, **GREEDY)
    whole = client.completions.create(**args).choices[0]
    chunks = list(
        client.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and chunks[-1] is usage_chunks[0] and not chunks[-1].choices
    assert chunks[-1].usage.completion_tokens == 6
    body = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in body) == whole.text
    tokens = [t for c in body for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in body for o in c.choices[0].logprobs.text_offset]
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    assert body[-1].choices[0].finish_reason == "length"
    # continuous_usage_stats: every chunk carries the usage so far.
    running = list(
        client.completions.create(
            **args,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )
    )
    counts = [c.usage.completion_tokens for c in running if c.choices]
    assert counts == sorted(counts) and counts[-1] == 6
    # Without include_usage there is no usage chunk.
    plain = list(client.completions.create(**args, stream=True))
    assert all(c.usage is None for c in plain) and all(c.choices for c in plain)


def test_chat_logprobs_in_the_chat_shape(server, client) -> None:
    tok = server.engine.tokenizer
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}],
        },
    ]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, logprobs=True, top_logprobs=3, **GREEDY
    )
    choice = r.choices[0]
    # List-of-parts content renders as the joined text.
    template = tok.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    )
    assert r.usage.prompt_tokens == len(tok.encode(template))
    content = choice.logprobs.content
    assert len(content) == 5 == r.usage.completion_tokens
    assert "".join(c.token for c in content) == choice.message.content
    for item in content:
        assert bytes(item.bytes).decode("utf-8", "replace") == item.token
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].token == item.token  # greedy: the top entry was chosen
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-5)
        assert [t.logprob for t in item.top_logprobs] == sorted(
            (t.logprob for t in item.top_logprobs), reverse=True
        )
    # logprobs without top_logprobs: the chosen tokens only.
    bare = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=3, logprobs=True, **GREEDY
    ).choices[0]
    assert [c.top_logprobs for c in bare.logprobs.content] == [[], [], []]
    assert (
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
        .choices[0]
        .logprobs
        is None
    )


def test_chat_streaming_with_logprobs_and_usage(client) -> None:
    messages = [{"role": "user", "content": "hello"}]
    args = dict(model=MODEL, messages=messages, max_tokens=6, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**args, **GREEDY).choices[0]
    chunks = list(
        client.chat.completions.create(
            **args, **GREEDY, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 6
    body = [c for c in chunks if c.choices]
    assert body[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content for c in body) == whole.message.content
    streamed = [item for c in body for item in c.choices[0].logprobs.content]
    assert [(i.token, round(i.logprob, 4)) for i in streamed] == [
        (i.token, round(i.logprob, 4)) for i in whole.logprobs.content
    ]
    assert all(len(i.top_logprobs) == 2 for i in streamed)


def test_n_and_best_of(client) -> None:
    r = client.completions.create(
        model=MODEL, prompt="abc", max_tokens=4, n=2, best_of=4, logprobs=0, temperature=1.0
    )
    assert len(r.choices) == 2 and r.usage.completion_tokens == 16  # all candidates count
    sums = [sum(c.logprobs.token_logprobs) for c in r.choices]
    assert sums == sorted(sums, reverse=True)
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3, n=3
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    r = client.completions.create(model=MODEL, prompt=["ab", "cd"], max_tokens=2, n=2)
    assert len(r.choices) == 4 and r.usage.prompt_tokens == 4


@pytest.mark.parametrize(
    ("route", "extra", "field"),
    [
        ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("chat", {"tool_choice": "required"}, "tool_choice"),
        ("chat", {"response_format": {"type": "structural_tag"}}, "response_format"),
        (
            "chat",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
        ),
        ("completion", {"regex": "(unclosed"}, "regex"),
        ("completion", {"regex": "a+", "ebnf": 'root ::= "a"'}, "ebnf"),
        ("chat", {"regex": "a+", "ignore_eos": True}, "ignore_eos"),
        ("chat", {"logit_bias": {"5": 10}}, "logit_bias"),
        ("completion", {"suffix": "end"}, "suffix"),
        ("chat", {"max_tokens": 0}, "max_tokens"),
        ("chat", {"max_completion_tokens": 0}, "max_completion_tokens"),
        ("completion", {"max_tokens": 0}, "max_tokens"),
        ("chat", {"add_generation_prompt": "no"}, "add_generation_prompt"),
        ("chat", {"top_logprobs": 2}, "top_logprobs"),
        ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat", {"logprobs": "yes"}, "logprobs"),
        ("completion", {"logprobs": -1}, "logprobs"),
        ("completion", {"echo": 1}, "echo"),
        ("completion", {"best_of": 1, "n": 2}, "best_of"),
        ("completion", {"best_of": 3, "stream": True}, "best_of"),
        ("chat", {"n": 2, "stream": True}, "n"),
        ("chat", {"stream_options": {"include_usage": True}}, "stream_options"),
        ("chat", {"stream": True, "stream_options": {"include_usag": True}}, "include_usag"),
        ("chat", {"functions": [{"name": "f"}]}, "functions"),
        (
            "chat",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0]",
        ),
        (
            "chat",
            {"messages": [{"role": "assistant", "content": "", "tool_calls": []}]},
            "messages[0].tool_calls",
        ),
    ],
)
def test_refused_fields_are_named(server, route: str, extra: dict, field: str) -> None:
    if route == "chat":
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}
        path = "/v1/chat/completions"
    else:
        body = {"model": MODEL, "prompt": "hi", **extra}
        path = "/v1/completions"
    r = httpx.post(f"{server.url}{path}", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"]


def test_client_raises_bad_request_and_server_keeps_serving(client, server) -> None:
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    ok = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        response_format={"type": "text"},
        tool_choice="none",
        extra_body={"add_generation_prompt": True},
    )
    assert ok.choices[0].finish_reason in ("length", "stop")
    raw = httpx.post(
        f"{server.url}/v1/completions",
        json={"prompt": [5, 6, 7], "max_tokens": 2, "echo": True, "temperature": 0},
        timeout=30,
    ).json()
    assert raw["choices"][0]["text"].startswith(server.engine.tokenizer.decode([5, 6, 7]))
    assert json.loads(json.dumps(raw))["usage"]["prompt_tokens"] == 3


def test_structured_output_through_the_client(client) -> None:
    schema = {
        "type": "object",
        "properties": {
            "answer": {"type": "string", "enum": ["yes", "no"]},
            "n": {"type": "integer"},
        },
        "required": ["answer", "n"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "answer"}],
        max_tokens=64,
        n=3,
        temperature=1.0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "reply", "schema": schema, "strict": True},
        },
    )
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice.message.content
        value = json.loads(choice.message.content)
        assert set(value) == {"answer", "n"} and value["answer"] in ("yes", "no")
        assert isinstance(value["n"], int)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "json"}],
            max_tokens=64,
            stream=True,
            response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
        )
    )
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert set(json.loads("".join(c.choices[0].delta.content for c in chunks))) == {"answer", "n"}
    c = client.completions.create(
        model=MODEL, prompt="pick", max_tokens=8, extra_body={"regex": "(red|green|blue)\\."}
    )
    assert c.choices[0].text in ("red.", "green.", "blue.")


def test_bench_serving_payloads(server) -> None:
    """SGLang bench_serving's sglang-oai and sglang-oai-chat payloads (--return-logprob
    --top-logprobs-num 3 for completions), streamed, as it sends and parses them."""
    completion = {
        "model": MODEL,
        "prompt": "a big cat",
        "best_of": 1,
        "max_tokens": 8,
        "stream": True,
        "temperature": 0.0,
        "ignore_eos": True,
        "logprobs": 3,
    }
    chat = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "a big cat"}],
        "max_completion_tokens": 8,
        "stream": True,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    for path, payload in (("/v1/completions", completion), ("/v1/chat/completions", chat)):
        events = []
        with httpx.stream("POST", f"{server.url}{path}", json=payload, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
        assert events and all("error" not in e for e in events)
        with_choices = [e for e in events if e["choices"]]
        assert with_choices[-1]["choices"][0]["finish_reason"] == "length"
        if path == "/v1/completions":
            rows = [
                row for e in with_choices for row in e["choices"][0]["logprobs"]["top_logprobs"]
            ]
            assert len(rows) == 8 and all(len(row) == 3 for row in rows)
        else:
            assert events[-1]["usage"]["completion_tokens"] == 8
