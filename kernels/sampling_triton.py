"""Triton sampler for rows that need no top-k/top-p/min-p filtering: one pass over the logits.

`sample` computes, per row b of logits [B, V] float32 with temperature T = temperatures[b]:
  * T > 0: token = argmax_v(logits[v] / T + g(u(seed, step, v))), g(u) = -log(-log(u)), with u the
    splitmix64 noise of `sampling.seeded_uniform` reproduced bit for bit (64-bit unsigned wrap-around
    products, logical shifts); logprob = logits[token] / T - logsumexp(logits / T).
  * T <= 0 (greedy): token = argmax_v logits[v]; logprob = log_softmax(logits)[token].
That is `sampling.sample_tokens(..., need_filter=False)`: argmax(log_softmax(x) + g) equals
argmax(x + g), since log_softmax only subtracts a per-row constant.

One program per row loops over the vocabulary in blocks of BLOCK, keeping per-lane running state
in registers (no cross-thread reduction inside the loop): the online logsumexp (running max m and
sum s in base 2, one exp2 per element: whichever of m, x is smaller gets scaled), and the running
best score and its first index. The lanes are combined once at the end, then the chosen token's
logit is read back for its logprob. Logits are read once; the Gumbel noise never touches memory.

Ties and rounding: the index of the first maximum wins, as torch.argmax; a NaN score (a -inf logit
plus the +inf Gumbel of u == 1.0) counts as the maximum, as in torch.argmax. The kernel scores
x + g where the reference scores (x - lse) + g, and scales by 1/T where the reference divides, so
two candidates within a few float32 ulps of each other may be ordered differently (none in 120k
emulated rows of random logits); logprobs agree to ~1e-6 relative. Greedy rows are exact. On the
GPU tl.log is libdevice's logf, as torch's, so the Gumbel noise is likely identical there too.

Invariants: no host syncs, grid and outputs sized from shapes only (CUDA-graph capturable); row
offsets are int64; logits must be contiguous in V (any row stride).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Splitmix64 constants of `sampling.seeded_uniform`, unsigned: each is >= 2^63, so Triton types it
# uint64 and every product with it wraps mod 2^64.
C_SEED: tl.constexpr = tl.constexpr(0x9E3779B97F4A7C15)
C_STEP: tl.constexpr = tl.constexpr(0xD1B54A32D192ED03)
C_TOKEN: tl.constexpr = tl.constexpr(0x8CB92BA72F3D8DD7)
MIX1: tl.constexpr = tl.constexpr(0xBF58476D1CE4E5B9)
MIX2: tl.constexpr = tl.constexpr(0x94D049BB133111EB)
NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))
POS_INF: tl.constexpr = tl.constexpr(float("inf"))

# Vocabulary block per loop iteration and warps per row program (4 float32 per thread at 16 warps:
# one 16-byte load each). The loop is arithmetic-bound (hash, two accurate logs, one exp2).
BLOCK = 2048
NUM_WARPS = 16
UNIFORM_BLOCK = 1024
_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _splitmix_uniform(x):
    """Uniform(0, 1) float32 from the pre-mix hash x = seed*C_SEED + step*C_STEP + token*C_TOKEN.

    x is uint64 (products wrap mod 2^64, >> is logical). Same bits as `seeded_uniform`: its last
    step x ^= x >> 31 leaves bits 41..63 unchanged, and only x >> 41 is used, so it is skipped. The
    (bits + 0.5) sum is exact in float32 (23 bits), so u stays strictly inside (0, 1).
    """
    x = x ^ (x >> 30)
    x = x * MIX1
    x = x ^ (x >> 27)
    x = x * MIX2
    bits = (x >> 41).to(tl.int32)
    return (bits.to(tl.float32) + 0.5) * (1.0 / 8388608.0)


@triton.jit
def _row_hash_base(seed_ptr, step_ptr, rows, row_mask):
    """seed * C_SEED + step * C_STEP as uint64 (int64 inputs reinterpreted, wrapping products)."""
    seed = tl.load(seed_ptr + rows, mask=row_mask, other=0).to(tl.uint64, bitcast=True)
    step = tl.load(step_ptr + rows, mask=row_mask, other=0).to(tl.uint64, bitcast=True)
    return seed * C_SEED + step * C_STEP


@triton.jit
def _sample_kernel(
    logits_ptr,
    temp_ptr,
    seed_ptr,
    step_ptr,
    tok_ptr,
    lp_ptr,
    stride_row,
    batch,
    vocab,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """ROWS rows per program (1 at LLM vocabulary sizes), [ROWS, BLOCK] tiles over the vocab."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < batch
    row_ptr = logits_ptr + rows.to(tl.int64)[:, None] * stride_row  # [ROWS, 1]
    t = tl.load(temp_ptr + rows, mask=row_mask, other=1.0)
    t_safe = tl.where(t <= 0.0, 1.0, t)  # greedy rows: log_softmax of the raw logits
    greedy = (t <= 0.0)[:, None]
    inv_t = 1.0 / t_safe[:, None]
    inv_t2 = inv_t * 1.4426950408889634  # log2(e) / T: the logsumexp runs in base 2

    lanes = tl.arange(0, BLOCK)[None, :]
    lane_hash = lanes.to(tl.uint64) * C_TOKEN  # token * C_TOKEN within a block
    block_hash = tl.full((), BLOCK, tl.uint64) * C_TOKEN  # one block further
    hash_base = _row_hash_base(seed_ptr, step_ptr, rows, row_mask)[:, None]

    m = tl.full((ROWS, BLOCK), NEG_INF, tl.float32)  # per-lane max of x * log2(e)
    s = tl.zeros((ROWS, BLOCK), tl.float32)  # per-lane sum of exp2(x * log2(e) - m)
    best = tl.full((ROWS, BLOCK), NEG_INF, tl.float32)  # per-lane best score ...
    best_idx = tl.zeros((ROWS, BLOCK), tl.int32)  # ... and its first index
    for start in range(0, vocab, BLOCK):
        cols = start + lanes
        mask = row_mask[:, None] & (cols < vocab)
        # Issued first, used last: the noise below does not depend on it and hides its latency.
        logit = tl.load(row_ptr + cols, mask=mask, other=NEG_INF).to(tl.float32)
        u = _splitmix_uniform(hash_base + lane_hash)
        hash_base += block_hash
        g = tl.where(greedy, 0.0, -tl.log(-tl.log(u)))  # greedy rows score the raw logits
        # Online logsumexp, one exp2: e scales the old sum (new max) or is the new term.
        x2 = logit * inv_t2
        m_new = tl.maximum(m, x2)
        e = tl.exp2(tl.minimum(m, x2) - m_new)
        e = tl.where(m_new == NEG_INF, 0.0, e)  # both -inf: nothing to add
        s = tl.where(x2 > m, s * e + 1.0, s + e)
        m = m_new
        # Gumbel-max: running per-lane best of x + g.
        score = logit * inv_t + g
        score = tl.where(score != score, POS_INF, score)  # NaN is the max, as torch.argmax
        score = tl.where(mask, score, NEG_INF)
        take = score > best  # strict: the earliest index keeps a tie
        best = tl.where(take, score, best)
        best_idx = tl.where(take, cols, best_idx)

    # Combine the lanes: first index of the best score; logsumexp of the per-lane (m, s).
    top = tl.max(best, axis=1)
    token = tl.min(tl.where(best == top[:, None], best_idx, 2147483647), axis=1)
    m_row = tl.max(m, axis=1)
    s_row = tl.sum(s * tl.exp2(m - m_row[:, None]), axis=1)
    lse = (m_row + tl.log2(s_row)) * 0.6931471805599453
    chosen = tl.load(logits_ptr + rows.to(tl.int64) * stride_row + token, mask=row_mask).to(
        tl.float32
    )
    logprob = chosen / t_safe - lse
    tl.store(tok_ptr + rows, token.to(tl.int64), mask=row_mask)
    tl.store(lp_ptr + rows, logprob, mask=row_mask)


@triton.jit
def _uniform_kernel(seed_ptr, step_ptr, out_ptr, vocab, BLOCK: tl.constexpr):
    """Debug/test kernel: the noise `_sample_kernel` draws, written out [B, V]."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    x = _row_hash_base(seed_ptr, step_ptr, row, True) + cols.to(tl.uint64) * C_TOKEN
    tl.store(out_ptr + row.to(tl.int64) * vocab + cols, _splitmix_uniform(x), mask=cols < vocab)


def launch_config(batch: int, vocab: int) -> tuple[int, int, int]:
    """(BLOCK, ROWS, num_warps): a tile of up to BLOCK elements, whole rows per program only when
    the vocabulary is shorter than a block (small test vocabularies: fewer, fuller programs)."""
    block = min(BLOCK, max(16, triton.next_power_of_2(vocab)))
    rows = max(1, min(BLOCK // block, triton.next_power_of_2(batch)))
    warps = max(1, min(NUM_WARPS, rows * block // 128))  # 4 float32 (16 bytes) per thread
    return block, rows, warps


def _rows(name: str, t: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """t as a contiguous [batch] tensor of dtype (no copy when it already is one)."""
    if t.shape != (batch,):
        raise ValueError(f"{name} must have shape [{batch}], got {tuple(t.shape)}")
    if dtype == torch.int64 and t.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    return t.to(dtype).contiguous()


def sample(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    *,
    out_tokens: torch.Tensor | None = None,
    out_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B] int64, logprobs [B] float32) for logits [B, V] contiguous in V, float32 or
    bfloat16 / float16 (upcast exactly in the kernel: the same draws as on `logits.float()`).

    Same draws as `sampling.sample_tokens(..., need_filter=False)`: temperatures [B] (<= 0 means
    greedy), seeds and steps [B] integers. One launch, no host sync; given outputs must be
    contiguous [B] int64 / float32.
    """
    if logits.dim() != 2 or logits.dtype not in _LOGIT_DTYPES or logits.stride(-1) != 1:
        raise ValueError(
            f"logits must be [B, V] float32/bfloat16/float16 contiguous in V, got {tuple(logits.shape)} "
            f"{logits.dtype} strides {logits.stride()}"
        )
    batch, vocab = logits.shape
    if vocab == 0 or vocab >= 2**31 - 1:
        raise ValueError(f"vocab size {vocab} out of range")
    temps = _rows("temperatures", temperatures, batch, torch.float32)
    seeds = _rows("seeds", seeds, batch, torch.int64)
    steps = _rows("steps", steps, batch, torch.int64)
    for name, t in (("temperatures", temps), ("seeds", seeds), ("steps", steps)):
        if t.device != logits.device:
            raise ValueError(f"{name} must be on {logits.device}, got {t.device}")
    tokens = _out("out_tokens", out_tokens, batch, torch.int64, logits.device)
    logprobs = _out("out_logprobs", out_logprobs, batch, torch.float32, logits.device)
    if batch == 0:
        return tokens, logprobs
    _launch(logits, temps, seeds, steps, tokens, logprobs, *launch_config(batch, vocab))
    return tokens, logprobs


def _launch(
    logits: torch.Tensor,
    temps: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    tokens: torch.Tensor,
    logprobs: torch.Tensor,
    block: int,
    rows: int,
    num_warps: int,
) -> None:
    """One launch of `_sample_kernel` on checked inputs (tests also time other configs)."""
    batch, vocab = logits.shape
    _sample_kernel[(triton.cdiv(batch, rows),)](
        logits,
        temps,
        seeds,
        steps,
        tokens,
        logprobs,
        logits.stride(0),
        batch,
        vocab,
        ROWS=rows,
        BLOCK=block,
        num_warps=num_warps,
        enable_fp_fusion=False,
    )


def seeded_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The kernel's noise [B, V] float32; equals `sampling.seeded_uniform` bit for bit (tests)."""
    batch = seeds.shape[0]
    seeds = _rows("seeds", seeds, batch, torch.int64)
    steps = _rows("steps", steps, batch, torch.int64)
    out = torch.empty(batch, vocab_size, dtype=torch.float32, device=seeds.device)
    if batch and vocab_size:
        grid = (batch, triton.cdiv(vocab_size, UNIFORM_BLOCK))
        _uniform_kernel[grid](
            seeds, steps, out, vocab_size, BLOCK=UNIFORM_BLOCK, num_warps=4, enable_fp_fusion=False
        )
    return out


def _out(
    name: str, out: torch.Tensor | None, size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    if out is None:
        return torch.empty(size, dtype=dtype, device=device)
    if out.shape != (size,) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous [{size}] {dtype}, got {tuple(out.shape)}")
    return out
