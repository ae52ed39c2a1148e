"""`rollout serve --pp-size N`: the flag parses (SGLang's name and alias), bad values are refused
by name, and a pp = 2 server answers /generate with pp = 1's tokens and reports its topology."""

from __future__ import annotations

import httpx
import pytest

from rollout_accel.rollout.cli import build_parser, engine_kwargs
from rollout_accel.serving.engine import Engine
from rollout_accel.serving.server import ServerThread
from rollout_accel.serving.server.server_args import ServerArgsError, parse_server_args

ARGS = dict(max_total_tokens=2048, max_running_requests=8)


def _parse(*flags: str) -> dict:
    args = build_parser().parse_args(["serve", "--model-path", "tiny-qwen3", *flags])
    return parse_server_args(args, engine_kwargs(args))[0]


def test_pp_flags() -> None:
    assert _parse("--pp-size", "2")["pp_size"] == 2
    kwargs = _parse("--pipeline-parallel-size", "3", "--pp-rebalance")
    assert (kwargs["pp_size"], kwargs["pp_rebalance"]) == (3, True)
    assert "pp_size" not in _parse()
    assert _parse("--pp-size", "2")["pp_cuda_graph"] is False
    assert _parse("--pp-size", "2", "--pp-cuda-graph")["pp_cuda_graph"] is True
    with pytest.raises(ServerArgsError, match="--pp-size"):
        _parse("--pp-size", "0")


def test_pp2_server_generates_like_pp1() -> None:
    body = {
        "input_ids": [[1, 2, 3, 4], [9, 8, 7]],
        "sampling_params": {
            "temperature": 0.8,
            "top_p": 0.9,
            "max_new_tokens": 8,
            "ignore_eos": True,
            "sampling_seed": 7,
        },
    }
    with Engine("tiny-qwen3", **ARGS) as ref:
        expected = [o["output_ids"] for o in ref.generate(**body)]
    with (
        ServerThread(model_path="tiny-qwen3", pp_size=2, **ARGS) as srv,
        httpx.Client(base_url=srv.url, timeout=120) as http,
    ):
        out = http.post("/generate", json=body)
        assert out.status_code == 200, out.text
        assert [o["output_ids"] for o in out.json()] == expected
        info = http.get("/server_info").json()
        assert info["pp_size"] == 2 and info["num_hidden_layers"] == 4
        bad = http.post("/generate", json={"input_ids": [1, 2], "sampling_params": {"top_p": 7}})
        assert bad.status_code == 400 and "top_p" in bad.text
        assert http.post("/generate", json=body).status_code == 200  # still serving
