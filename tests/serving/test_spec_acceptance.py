"""Exact acceptance: the vectorised rule equals its plain loop, and speculative decoding with it
emits exactly what sequential seeded sampling emits, at any temperature / top-p / top-k."""

from __future__ import annotations

import os
import random

import pytest
import torch

from rollout_accel.kernels.sampling import sample_tokens
from rollout_accel.serving.spec.acceptance import verify_drafts, verify_drafts_reference

VOCAB = 50
# (temperature, top_k, top_p, min_p)
PARAMS = [(0.0, -1, 1.0, 0.0), (1.0, -1, 1.0, 0.0), (1.0, 8, 0.9, 0.0), (0.7, 20, 1.0, 0.05)]


@pytest.fixture
def seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _params(rows: list[tuple[float, int, float, float]]) -> dict[str, torch.Tensor]:
    return {
        "temperatures": torch.tensor([r[0] for r in rows]),
        "top_ks": torch.tensor([r[1] for r in rows]),
        "top_ps": torch.tensor([r[2] for r in rows]),
        "min_ps": torch.tensor([r[3] for r in rows]),
    }


def test_vectorised_equals_reference(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    rows, k = 24, 5
    logits = torch.randn(rows, k + 1, VOCAB, generator=gen) * 3
    row_params = [PARAMS[i % len(PARAMS)] for i in range(rows)]
    p = _params(row_params)
    seeds = torch.randint(0, 2**31, (rows,), generator=gen)
    steps = torch.randint(0, 100, (rows,), generator=gen)
    # Drafts: the target's own samples (so some get accepted), corrupted at a random place.
    first = verify_drafts(
        logits,
        torch.zeros(rows, k, dtype=torch.int64),
        torch.zeros(rows, dtype=torch.int64),
        **p,
        seeds=seeds,
        steps=steps,
    )
    drafts = first.tokens[:, :k].clone()
    lens = torch.tensor([rng.randint(0, k) for _ in range(rows)])
    for r in range(rows):
        if rng.random() < 0.6:
            drafts[r, rng.randrange(k)] = rng.randrange(VOCAB)
    got = verify_drafts(logits, drafts, lens, **p, seeds=seeds, steps=steps).emitted()
    ref = verify_drafts_reference(
        logits,
        [drafts[r, : lens[r]].tolist() for r in range(rows)],
        *[[row[i] for row in row_params] for i in range(4)],
        seeds.tolist(),
        steps.tolist(),
    )
    assert [t for t, _ in got] == [t for t, _ in ref], f"seed={seed}"
    for (_, lp_got), (_, lp_ref) in zip(got, ref, strict=True):
        assert torch.allclose(torch.tensor(lp_got), torch.tensor(lp_ref), atol=1e-6)
    accepted = sum(len(t) - 1 for t, _ in got)
    assert accepted > 0, "test drafts should be partly accepted"


class ToyTarget:
    """A 'model' whose logits at a position depend on the last two tokens (so continuations
    repeat and drafts from an earlier sample are often right)."""

    def __init__(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.randn(VOCAB, VOCAB, VOCAB, generator=gen) * 4

    def logits(self, context: list[int]) -> torch.Tensor:
        return self.table[context[-2], context[-1]]


@pytest.mark.parametrize("params", PARAMS)
def test_speculative_equals_sequential(seed: int, params: tuple[float, int, float, float]) -> None:
    target = ToyTarget(seed)
    rng = random.Random(seed)
    prompt, n_new, req_seed = [1, 2], 60, rng.randrange(2**31)
    p = _params([params])

    def sample_at(context: list[int], step: int) -> tuple[int, float]:
        tok, lp = sample_tokens(
            target.logits(context)[None],
            **p,
            seeds=torch.tensor([req_seed]),
            steps=torch.tensor([step]),
        )
        return int(tok), float(lp)

    seq_tokens, seq_lps = [], []
    for step in range(n_new):
        tok, lp = sample_at(prompt + seq_tokens, step)
        seq_tokens.append(tok)
        seq_lps.append(lp)
    # An earlier "epoch" with another seed: a draft source that is right only part of the time.
    other = []
    for step in range(n_new):
        tok, _ = sample_tokens(
            target.logits(prompt + other)[None],
            **p,
            seeds=torch.tensor([req_seed + 1]),
            steps=torch.tensor([step]),
        )
        other.append(int(tok))

    out_tokens: list[int] = []
    out_lps: list[float] = []
    verifies = 0
    while len(out_tokens) < n_new:
        pos = len(out_tokens)
        k = rng.randint(0, 4)
        source = seq_tokens if rng.random() < 0.5 else other  # oracle or stale sample
        draft = [t if rng.random() < 0.85 else rng.randrange(VOCAB) for t in source[pos : pos + k]]
        ctx = prompt + out_tokens
        logits = torch.stack([target.logits(ctx + draft[:i]) for i in range(len(draft) + 1)])
        width = len(draft) + 1
        padded = torch.zeros(1, 4, dtype=torch.int64)
        padded[0, : len(draft)] = torch.tensor(draft, dtype=torch.int64)
        full = torch.zeros(1, 5, VOCAB)
        full[0, :width] = logits
        res = verify_drafts(
            full,
            padded,
            torch.tensor([len(draft)]),
            **p,
            seeds=torch.tensor([req_seed]),
            steps=torch.tensor([pos]),
        )
        tokens, lps = res.emitted()[0]
        out_tokens += tokens
        out_lps += lps
        verifies += 1
    assert out_tokens[:n_new] == seq_tokens, f"seed={seed}"
    assert torch.allclose(torch.tensor(out_lps[:n_new]), torch.tensor(seq_lps), atol=1e-6)
    assert verifies < n_new, "drafts should have saved some steps"
