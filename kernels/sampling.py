"""Batched token sampling: temperature, top-k, top-p, min-p, seeded per request, with logprobs.

Vectorised PyTorch that runs unchanged on CPU and GPU (one sort per batch, no per-row Python, no
host sync). Randomness comes from a counter-based hash of (seed, step, token id), so a request's
draws depend only on its own seed and position: reproducible whatever else shares the batch, on
any device, and capturable in a CUDA graph.

Sampling uses the Gumbel-max trick: argmax(logprob + Gumbel noise) over the kept tokens draws from
the renormalised filtered distribution. The reported logprob is the unfiltered
log_softmax(logits / temperature) of the chosen token (raw log_softmax for greedy rows), which is
what RL trainers recompute on their side.

`sample_tokens_fast` is the engine's entry point: on CUDA, batches that need no top-k/top-p/min-p
filtering go to a one-pass Triton kernel (`sampling_triton`) that draws from the same noise; the
rest, and every CPU batch, go to `sample_tokens`. `ROLLOUT_ACCEL_SAMPLING=reference|triton` forces a
backend (read on every call).
"""

from __future__ import annotations

import torch

from .backend import Backend, choose_backend

try:
    from . import sampling_triton as _triton_impl
except ImportError:  # no triton on this machine: the reference serves every call
    _triton_impl = None

ENV_VAR = "ROLLOUT_ACCEL_SAMPLING"

_MASK64 = (1 << 64) - 1


def _i64(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_C_SEED = _i64(0x9E3779B97F4A7C15)
_C_STEP = _i64(0xD1B54A32D192ED03)
_C_TOKEN = _i64(0x8CB92BA72F3D8DD7)
_MIX1 = _i64(0xBF58476D1CE4E5B9)
_MIX2 = _i64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def seeded_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform(0, 1) noise [batch, vocab] from splitmix64 of (seed, step, token); float32."""
    tokens = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    x = (seeds.to(torch.int64) * _C_SEED + steps.to(torch.int64) * _C_STEP)[:, None] + tokens[
        None, :
    ] * _C_TOKEN
    x = x ^ _shr(x, 30)
    x = x * _MIX1
    x = x ^ _shr(x, 27)
    x = x * _MIX2
    x = x ^ _shr(x, 31)
    # 23 bits so that bits + 0.5 is exact in float32: u stays strictly inside (0, 1) (with 24 bits
    # the top value rounds to 1.0, whose Gumbel noise is +inf and overrides every logit and ban).
    return (_shr(x, 41).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def apply_penalties(
    logits: torch.Tensor,
    counts: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
    repetition: torch.Tensor,
) -> torch.Tensor:
    """OpenAI frequency/presence and CTRL repetition penalties over output-token counts [B, V]."""
    seen = counts > 0
    rep = repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - frequency[:, None] * counts - presence[:, None] * seen.to(logits.dtype)


def sample_tokens(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_ks: torch.Tensor,
    top_ps: torch.Tensor,
    min_ps: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    need_filter: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] float32 -> (token ids [B] int64, logprobs [B] float32).

    temperatures 0 -> greedy; top_ks <= 0 or >= V -> off; top_ps 1 -> off; min_ps 0 -> off.
    `need_filter=False` skips the sort when the caller knows no row filters.
    """
    vocab = logits.shape[1]
    greedy = temperatures <= 0
    safe_t = torch.where(greedy, torch.ones_like(temperatures), temperatures)
    logprobs_all = torch.log_softmax(logits / safe_t[:, None], dim=-1)
    scores = logprobs_all
    if need_filter:
        sorted_lp, order = torch.sort(logprobs_all, dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        k = torch.where((top_ks <= 0) | (top_ks > vocab), torch.full_like(top_ks, vocab), top_ks)
        drop = ranks >= k[:, None]
        probs = sorted_lp.exp()
        before = torch.cumsum(probs, dim=-1) - probs  # mass strictly above each token
        drop |= before > top_ps[:, None]
        drop |= probs < (min_ps[:, None] * probs[:, :1])
        drop[:, 0] = False  # the most likely token always survives
        sorted_scores = sorted_lp.masked_fill(drop, float("-inf"))
        scores = torch.empty_like(sorted_scores).scatter_(1, order, sorted_scores)
    gumbel = -torch.log(-torch.log(seeded_uniform(seeds, steps, vocab)))
    sampled = torch.argmax(scores + gumbel, dim=-1)
    tokens = torch.where(greedy, torch.argmax(logits, dim=-1), sampled)
    logprobs = logprobs_all.gather(1, tokens[:, None]).squeeze(1)
    return tokens, logprobs


# --- dispatch ------------------------------------------------------------------------------------


def sampling_backend(device: torch.device) -> Backend:
    """Backend for tensors on `device`: the env override, else Triton on CUDA if importable."""
    return choose_backend(ENV_VAR, device, _triton_impl is not None)


def sample_tokens_fast(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_ks: torch.Tensor,
    top_ps: torch.Tensor,
    min_ps: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    need_filter: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_tokens` with the same arguments and draws, one Triton kernel where it applies.

    The kernel serves `need_filter=False` batches of logits contiguous in V (float32, or half
    precision upcast exactly inside the kernel; the caller
    vouches that no row filters: top_ks/top_ps/min_ps are then ignored, as `sample_tokens` does);
    anything else falls back to `sample_tokens`. Both paths are CUDA-graph capturable.
    Tokens match the reference except at float32 near-ties of the Gumbel scores (see
    `sampling_triton`); logprobs agree to ~1e-6 relative.
    """
    if (
        not need_filter
        and logits.dim() == 2
        and logits.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and logits.stride(-1) == 1
        and sampling_backend(logits.device) == "triton"
    ):
        assert _triton_impl is not None
        return _triton_impl.sample(logits, temperatures, seeds, steps)
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    return sample_tokens(
        logits, temperatures, top_ks, top_ps, min_ps, seeds, steps, need_filter=need_filter
    )
