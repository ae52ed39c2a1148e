"""KV reuse on a GPU: the Triton paths (re-rotation, selective attention) against the reference
paths inside a real blend, r = 1 bit-identical to full prefill, and the engine (CUDA graphs,
overlap) serving segment-marked prompts.

Marked `gpu`: skipped without CUDA; run on a GPU by scripts/gpu_tests.sh.
"""

from __future__ import annotations

import random

import pytest
import torch

from rollout_accel.serving.engine import Engine
from rollout_accel.serving.kvreuse.blend import BlendSettings
from rollout_accel.serving.kvreuse.prefiller import ReusePrefiller
from rollout_accel.serving.kvreuse.quality import kl_divergence
from rollout_accel.serving.models import load_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


def _stream(seed: int = 0):
    rng = random.Random(seed)
    docs = [[rng.randrange(3, 500) for _ in range(n)] for n in (300, 200, 250)]
    out = []
    for head in range(3):
        ids = [rng.randrange(3, 500) for _ in range(10 + head)]
        segs = []
        for doc in rng.sample(docs, 3):
            segs.append((len(ids), len(ids) + len(doc)))
            ids += doc
        ids += [rng.randrange(3, 500) for _ in range(12)]
        out.append((ids, segs))
    return out


def _last_logits(model, settings, prompts):
    pf = ReusePrefiller.create(model, 8192, settings, 16)
    logits = None
    for ids, segs in prompts:
        res = pf.prefill(ids, segs)
        logits = res.logits
        pf.finish(res)
    return logits, pf


@pytest.fixture(scope="module")
def model():
    m = load_model("tiny-qwen3", dtype="bfloat16", device="cuda").model
    m.fuse_projections()
    return m


def test_ratio_one_equals_full_prefill_on_gpu(model) -> None:
    prompts = _stream()
    full, _ = _last_logits(model, None, prompts)
    blended, pf = _last_logits(model, BlendSettings(recompute_ratio=1.0), prompts)
    assert pf.metrics.reused_tokens > 0
    assert torch.equal(full, blended)


def test_triton_paths_match_reference_paths_in_a_blend(model, monkeypatch) -> None:
    prompts = _stream(1)
    settings = BlendSettings(recompute_ratio=0.15)
    tri, pf = _last_logits(model, settings, prompts)
    assert pf.metrics.reused_tokens > 0
    from rollout_accel.kernels.backend import reload_overrides

    monkeypatch.setenv("ROLLOUT_ACCEL_REROTATE", "reference")
    monkeypatch.setenv("ROLLOUT_ACCEL_SELECTIVE_ATTENTION", "reference")
    reload_overrides()
    try:
        ref, _ = _last_logits(model, settings, prompts)
    finally:
        monkeypatch.delenv("ROLLOUT_ACCEL_REROTATE")
        monkeypatch.delenv("ROLLOUT_ACCEL_SELECTIVE_ATTENTION")
        reload_overrides()
    assert kl_divergence(ref, tri) < 1e-3


def test_engine_serves_segments_on_gpu() -> None:
    prompts = _stream(2)
    greedy = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    with (
        Engine("tiny-qwen3", kv_reuse_recompute_ratio=1.0) as eng,
        Engine("tiny-qwen3", kv_reuse=False) as plain,
    ):
        for ids, segs in prompts:
            out = eng.generate(
                input_ids=ids, segments=[list(s) for s in segs], sampling_params=greedy
            )
            ref = plain.generate(input_ids=ids, sampling_params=greedy)
            assert out["output_ids"] == ref["output_ids"]
        assert out["meta_info"]["kvreuse"]["reused_tokens"] > 0
    with Engine("tiny-qwen3") as eng:
        outs = eng.generate(
            input_ids=[ids for ids, _ in prompts] * 2,
            segments=[[list(s) for s in segs] for _, segs in prompts] * 2,
            sampling_params=greedy,
        )
        assert all(len(o["output_ids"]) == 24 for o in outs)
        assert eng.get_loads()["kvreuse"]["reused_tokens"] > 0
