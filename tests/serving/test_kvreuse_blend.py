"""Selective-recompute prefill: r = 1 is full prefill exactly; reused K is the K the model writes
at the new positions; partial ratios reuse what they claim; refused rope variants fall back."""

from __future__ import annotations

import random

import pytest
import torch

from rollout_accel.kernels.rerotate import rerotate_reference
from rollout_accel.serving.kvreuse.blend import BlendSettings
from rollout_accel.serving.kvreuse.quality import greedy_decode
from rollout_accel.serving.kvreuse.rerotate import inv_freq, rope_refusal
from rollout_accel.serving.models.decoder import apply_rotary
from tests.serving.kvreuse_helpers import audit_slots, make_prefiller, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _words(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 500) for _ in range(n)]


def _workload(seed: int = 0):
    """Two prompts sharing two documents in swapped order after different heads."""
    rng = random.Random(seed)
    doc_a, doc_b = _words(rng, 40), _words(rng, 32)
    head1, head2, tail = _words(rng, 10), _words(rng, 14), _words(rng, 6)
    first = head1 + doc_a + doc_b + tail
    second = head2 + doc_b + _words(rng, 3) + doc_a + tail
    segs1 = [(10, 50), (50, 82)]
    segs2 = [(14, 46), (49, 89)]
    return (first, segs1), (second, segs2)


def _run(prefiller, prompts, steps: int = 12):
    """Prefills each prompt, decodes `steps` greedy tokens, finishes; returns the last prompt's
    (logits, tokens, KV per layer of its slots)."""
    out = None
    for ids, segs in prompts:
        res = prefiller.prefill(ids, segs)
        toks = greedy_decode(
            prefiller.model,
            prefiller.cache,
            res.slots,
            res.logits,
            steps,
            prefiller.alloc,
            prefiller.allocator.free,
        )
        kv = [
            (prefiller.cache.k[i][res.slots].clone(), prefiller.cache.v[i][res.slots].clone())
            for i in range(len(prefiller.cache.k))
        ]
        out = (res, toks, kv)
        prefiller.finish(res)
    return out


def test_ratio_one_is_full_prefill(model) -> None:
    prompts = _workload()
    full = _run(make_prefiller(model, reuse=False), prompts)
    reuse_pf = make_prefiller(model, settings=BlendSettings(recompute_ratio=1.0))
    blended = _run(reuse_pf, prompts)
    assert blended[0].blend is not None and blended[0].blend.reused_tokens == 72
    assert torch.equal(blended[0].logits, full[0].logits)
    assert blended[1] == full[1]
    for (kb, vb), (kf, vf) in zip(blended[2], full[2], strict=True):
        torch.testing.assert_close(kb, kf, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(vb, vf, rtol=1e-6, atol=1e-6)
    audit_slots(reuse_pf)


def test_partial_ratio_recomputes_the_share_it_claims(model) -> None:
    prompts = _workload(1)
    pf = make_prefiller(model, settings=BlendSettings(recompute_ratio=0.25, check_layer=1))
    first = pf.prefill(*prompts[0])
    assert first.blend is not None and first.blend.reused_tokens == 0  # nothing stored yet
    pf.finish(first)
    assert pf.metrics.stored_tokens == 72
    second = pf.prefill(*prompts[1])
    b = second.blend
    assert (
        b is not None and b.reused_tokens == 72 and b.new_tokens == 89 + 6 - 72 - second.prefix_len
    )
    assert b.recomputed_reused == 18  # ceil(0.25 * 72)
    n = 95 - second.prefix_len
    selected = b.new_tokens + b.recomputed_reused
    layers = model.config.num_hidden_layers
    assert b.token_layers == n + selected * (layers - 1)
    # Not-selected reused tokens keep the placed chunk KV in layers past the check layer: V is
    # the chunk's V exactly.
    chunk_a = pf.store.lookup(prompts[0][0][10:50])
    last = layers - 1
    v_req = pf.cache.v[last][second.slots[49:89]]
    v_chunk = pf.cache.v[last][chunk_a.slots]
    same = (v_req == v_chunk).all(dim=(1, 2))
    assert int(same.sum()) >= 40 - 18
    pf.finish(second)
    audit_slots(pf)


def test_rerotated_k_equals_k_at_new_positions(model) -> None:
    """Layer-0 K depends on the token only, so a chunk's placed K must equal the K that full
    prefill writes for the same tokens at the new positions."""
    prompts = _workload(2)
    pf = make_prefiller(model, settings=BlendSettings(recompute_ratio=0.0, check_layer=1))
    pf.finish(pf.prefill(*prompts[0]))
    second = pf.prefill(*prompts[1])
    full = make_prefiller(model, reuse=False)
    ref = full.prefill(*prompts[1])
    # layer 1 holds placed (re-rotated) K for reused, not-selected tokens; compare layer-0 K via
    # a direct re-rotation of the stored chunk instead (layer 0 is recomputed by design).
    chunk = pf.store.lookup(prompts[0][0][50:82])  # doc_b, stored at positions 50..81
    k_old = pf.cache.k[0][chunk.slots]
    k_new = rerotate_reference(
        k_old, chunk.positions(), torch.arange(14, 46), inv_freq(model, torch.device("cpu"))
    )
    torch.testing.assert_close(k_new, full.cache.k[0][ref.slots[14:46]], rtol=1e-5, atol=1e-5)
    pf.finish(second)
    full.finish(ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rerotation_matches_rotary_at_new_positions(model, dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    rotary = model.model.rotary
    n, heads, dim = 64, 2, model.config.head_dim
    x = torch.randn(n, heads, dim, generator=gen)
    old = torch.randint(0, 8000, (n,), generator=gen)
    new = torch.randint(0, 8000, (n,), generator=gen)
    cos_o, sin_o = rotary(old)
    cos_n, sin_n = rotary(new)
    k_old = apply_rotary(x, cos_o, sin_o).to(dtype)
    expected = apply_rotary(x, cos_n, sin_n)
    got = rerotate_reference(k_old, old, new, rotary.inv_freq)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)


def test_refused_rope_variant_falls_back_to_full_prefill(model) -> None:
    prompts = _workload(3)
    scaled = tiny_model()
    object.__setattr__(
        scaled,
        "config",
        scaled.config.with_updates(extra={"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
    )
    assert "yarn" in (rope_refusal(scaled) or "")
    assert rope_refusal(model) is None
    pf = make_prefiller(scaled, settings=BlendSettings(recompute_ratio=0.15))
    full = make_prefiller(model, reuse=False)
    for ids, segs in prompts:
        a, b = pf.prefill(ids, segs), full.prefill(ids, segs)
        assert a.blend is None and torch.equal(a.logits, b.logits)
        pf.finish(a)
        full.finish(b)
    assert pf.metrics.fallbacks == 2 and pf.metrics.reused_tokens == 0
    audit_slots(pf)
