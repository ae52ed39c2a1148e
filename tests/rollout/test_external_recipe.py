"""The slime external-engine recipe: its `rollout serve` flags parse and pass our SGLang-name
checks, and it hands slime the engines it started."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from rollout_accel.rollout.cli import build_parser, engine_kwargs
from rollout_accel.serving.server.server_args import parse_server_args

SCRIPT = Path(__file__).resolve().parents[2] / "recipes" / "slime" / "run-qwen3-4B-external.sh"


def _serve_flags(text: str) -> list[str]:
    """The arguments after `rollout serve` up to the output redirection, shell variables given
    sample values."""
    command = text[
        text.index("nohup rollout serve") + len("nohup ") : text.index('> "/tmp/rollout-serve-')
    ]
    command = command.replace("\\\n", " ")
    for var, value in {
        '"${HF_CHECKPOINT}"': "/root/Qwen3-4B",
        '"${ENGINE_HOST}"': "127.0.0.1",
        "${PORT}": "30000",
    }.items():
        command = command.replace(var, value)
    return shlex.split(command)[2:]


def test_serve_flags_parse_with_sglang_names() -> None:
    text = SCRIPT.read_text()
    args = build_parser().parse_args(["serve", *_serve_flags(text)])
    kwargs, server = parse_server_args(args, engine_kwargs(args))
    assert kwargs["model_path"] == "/root/Qwen3-4B" and kwargs["dtype"] == "bfloat16"
    assert kwargs["mem_fraction_static"] == 0.8 and kwargs["max_prefill_tokens"] == 8192
    assert server.port == 30000 and server.enable_memory_saver is False


def test_slime_gets_the_engines_and_no_colocation() -> None:
    text = SCRIPT.read_text()
    assert "--rollout-external-engine-addrs ${ENGINE_ADDRS[@]}" in text
    for flag in ("--colocate", "--offload"):  # with --offload slime expects the memory saver on
        assert not re.search(rf"^\s*{flag}", text, re.MULTILINE), flag
