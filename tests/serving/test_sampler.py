"""The batched sampler against exact distributions computed directly."""

from __future__ import annotations

import torch

from rollout_accel.kernels.sampling import sample_tokens, seeded_uniform


def _empirical(logits: torch.Tensor, draws: int, **kw) -> torch.Tensor:
    batch = logits.expand(draws, -1).contiguous()
    seeds = torch.arange(draws, dtype=torch.int64) * 7919 + 13

    def full(name, default, dtype=torch.float32):
        return torch.full((draws,), kw.get(name, default), dtype=dtype)

    tokens, _ = sample_tokens(
        batch,
        full("temperature", 1.0),
        full("top_k", -1, torch.int64),
        full("top_p", 1.0),
        full("min_p", 0.0),
        seeds,
        torch.zeros(draws, dtype=torch.int64),
    )
    return torch.bincount(tokens, minlength=logits.shape[-1]).float() / draws


def _expected(
    logits: torch.Tensor, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0
) -> torch.Tensor:
    probs = torch.softmax(logits[0] / temperature, dim=-1)
    order = torch.argsort(probs, descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    mass = 0.0
    for rank, tok in enumerate(order.tolist()):
        if top_k > 0 and rank >= top_k:
            break
        if rank > 0 and mass > top_p:
            break
        if probs[tok] < min_p * probs[order[0]]:
            break
        keep[tok] = True
        mass += probs[tok].item()
    out = torch.where(keep, probs, torch.zeros_like(probs))
    return out / out.sum()


def test_filtered_distributions_match() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 12, generator=gen) * 1.5
    for kw in (
        {},
        {"temperature": 0.5},
        {"top_k": 3},
        {"top_p": 0.6},
        {"min_p": 0.2},
        {"top_k": 5, "top_p": 0.8},
    ):
        got = _empirical(logits, 40_000, **kw)
        want = _expected(logits, **kw)
        assert (got - want).abs().max() < 0.015, kw
        assert (got[want == 0] == 0).all(), kw


def test_greedy_rows_and_logprobs() -> None:
    logits = torch.randn(4, 50)
    temps = torch.tensor([0.0, 1.0, 0.0, 0.7])
    tokens, logprobs = sample_tokens(
        logits,
        temps,
        torch.full((4,), -1),
        torch.ones(4),
        torch.zeros(4),
        torch.arange(4),
        torch.zeros(4, dtype=torch.int64),
    )
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()
    ref = torch.log_softmax(logits[3] / 0.7, dim=-1)[tokens[3]]
    assert torch.isclose(logprobs[3], ref, atol=1e-5)
    assert torch.isclose(logprobs[0], torch.log_softmax(logits[0], -1).max(), atol=1e-5)


def test_seeded_noise_is_uniform_and_deterministic() -> None:
    seeds = torch.tensor([1, 2, 1])
    steps = torch.tensor([0, 0, 0])
    u = seeded_uniform(seeds, steps, 100_000)
    assert torch.equal(u[0], u[2]) and not torch.equal(u[0], u[1])
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005
    hist = torch.histc(u[1], bins=10, min=0, max=1) / u.shape[1]
    assert (hist - 0.1).abs().max() < 0.01
