"""Structured output on the GPU: the mask is applied to the CUDA-graph decode logits, and
constrained requests stay out of overlapped steps while free ones in the same run overlap.

Marked `gpu`: skipped without CUDA or without xgrammar (pip install 'rollout-accel[structured]').
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from rollout_accel.serving.engine import Engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]
pytest.importorskip("xgrammar")

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["ok", "n"],
    "additionalProperties": False,
}


def test_grammar_on_graph_decode() -> None:
    with Engine("tiny-qwen3", device="cuda", dtype="float32") as eng:
        free = {"temperature": 0, "max_new_tokens": 48, "ignore_eos": True}
        params = [
            free,
            {"temperature": 1.0, "max_new_tokens": 48, "json_schema": json.dumps(SCHEMA)},
        ]
        params += [{"temperature": 1.0, "max_new_tokens": 16, "regex": r"[a-c]{2,5}!"}, free]
        outs = eng.generate(
            input_ids=[[5, 6, 7], [8, 9], [1, 2, 3, 4], [3]], sampling_params=params
        )
        assert eng.runner.graphs is not None and eng.runner.graphs.replays > 0
        assert outs[1]["meta_info"]["finish_reason"]["type"] == "stop", outs[1]["text"]
        assert set(json.loads(outs[1]["text"])) == {"ok", "n"}
        assert re.fullmatch(r"[a-c]{2,5}!", outs[2]["text"]), outs[2]["text"]
        # Free rows are unaffected by sharing steps with constrained ones.
        alone = eng.generate(input_ids=[5, 6, 7], sampling_params=free)
        assert alone["output_ids"] == outs[0]["output_ids"]
