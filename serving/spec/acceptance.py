"""Exact acceptance of draft tokens through the engine's seeded sampler.

The engine draws token t of a request as a deterministic function of (seed, output position t,
target distribution at t): `kernels.sampling` adds Gumbel noise hashed from (seed, position, token
id) and takes the argmax (greedy rows: the plain argmax). Verification reuses that coupling. A
row with k draft tokens d_0..d_{k-1} is scored in one forward, giving k + 1 target distributions;
position i is sampled with the same seeded sampler at output position p + i, and the row keeps the
longest prefix where d_i equals the sampled token, then appends the sampled token at the first
mismatch (or after the last draft: the bonus). Every emitted token is the token non-speculative
decoding would have drawn at that position given the same prefix, so speculative output is
token-identical to plain decoding for the same seed at any temperature, top-p, top-k and min-p,
and the logprobs are the target model's. (This is the standard rejection rule for a point-mass
draft, acceptance probability p(d), with shared randomness.)

Position-dependent logit rules (repetition/frequency/presence penalties, the min_new_tokens ban)
are not applied here: the proposer does not draft for requests they affect, so the verify logits
equal the decode logits at every drafted position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rollout_accel.kernels.sampling import sample_tokens, sample_tokens_fast


@dataclass(slots=True)
class VerifyResult:
    """Per row: `num_accepted` draft tokens were accepted; the row emits
    tokens[row, :num_accepted + 1] (the accepted drafts, which equal the sampled tokens, then the
    sampled token at the first mismatch or the bonus) with their logprobs."""

    num_accepted: torch.Tensor  # [R] int64
    tokens: torch.Tensor  # [R, K + 1] int64
    logprobs: torch.Tensor  # [R, K + 1] float32

    def emitted(self) -> list[tuple[list[int], list[float]]]:
        """Host lists of each row's emitted tokens and logprobs (one device sync)."""
        counts = self.num_accepted.tolist()
        tokens = self.tokens.tolist()
        logprobs = self.logprobs.tolist()
        return [
            (t[: n + 1], lp[: n + 1]) for n, t, lp in zip(counts, tokens, logprobs, strict=True)
        ]


def verify_drafts(
    logits: torch.Tensor,
    drafts: torch.Tensor,
    draft_lens: torch.Tensor,
    temperatures: torch.Tensor,
    top_ks: torch.Tensor,
    top_ps: torch.Tensor,
    min_ps: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    need_filter: bool = True,
) -> VerifyResult:
    """Vectorised verification of a batch of linear drafts (no host sync).

    logits [R, K + 1, V] float32: position i scores the token after draft[:i].
    drafts [R, K] int64 (entries at i >= draft_lens[r] are ignored); draft_lens [R] in [0, K].
    temperatures, top_ks, top_ps, min_ps, seeds: per row, as `kernels.sampling.sample_tokens`.
    steps [R]: the output position of each row's first scored token (len(output_ids)).
    need_filter: as in `sample_tokens_fast`; pass what plain decoding of these rows would pass so
    both take the same sampling backend.
    """
    rows, width, vocab = logits.shape
    if drafts.shape != (rows, width - 1):
        raise ValueError(f"drafts {tuple(drafts.shape)} != ({rows}, {width - 1})")
    positions = torch.arange(width, device=logits.device)

    def per_position(t: torch.Tensor) -> torch.Tensor:
        return t[:, None].expand(rows, width).reshape(-1)

    tokens, logprobs = sample_tokens_fast(
        logits.reshape(rows * width, vocab),
        per_position(temperatures),
        per_position(top_ks),
        per_position(top_ps),
        per_position(min_ps),
        per_position(seeds),
        (steps.to(torch.int64)[:, None] + positions[None, :]).reshape(-1),
        need_filter=need_filter,
    )
    tokens = tokens.view(rows, width)
    logprobs = logprobs.view(rows, width)
    matched = (tokens[:, :-1] == drafts) & (positions[None, :-1] < draft_lens[:, None])
    num_accepted = torch.cumprod(matched.to(torch.int64), dim=1).sum(dim=1)
    return VerifyResult(num_accepted=num_accepted, tokens=tokens, logprobs=logprobs)


def verify_drafts_reference(
    logits: torch.Tensor,
    drafts: list[list[int]],
    temperatures: list[float],
    top_ks: list[int],
    top_ps: list[float],
    min_ps: list[float],
    seeds: list[int],
    steps: list[int],
) -> list[tuple[list[int], list[float]]]:
    """Plain loop of the same rule, one position at a time (the oracle of `verify_drafts`).

    Returns per row the emitted tokens and logprobs.
    """
    out: list[tuple[list[int], list[float]]] = []
    for r, draft in enumerate(drafts):
        tokens: list[int] = []
        logprobs: list[float] = []
        for i in range(len(draft) + 1):
            tok, lp = sample_tokens(
                logits[r, i][None],
                torch.tensor([temperatures[r]]),
                torch.tensor([top_ks[r]]),
                torch.tensor([top_ps[r]]),
                torch.tensor([min_ps[r]]),
                torch.tensor([seeds[r]]),
                torch.tensor([steps[r] + i]),
            )
            tokens.append(int(tok))
            logprobs.append(float(lp))
            if i == len(draft) or tokens[-1] != draft[i]:
                break
        out.append((tokens, logprobs))
    return out
