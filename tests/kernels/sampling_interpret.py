"""Runs the Triton sampler under Triton's CPU interpreter against `kernels.sampling`.

Usage, from the repository root: python -m tests.kernels.sampling_interpret [hash|match|dist|dispatch]
Exits 1 if any case fails. TRITON_INTERPRET must be set before triton is imported, hence a script
of its own run in a fresh process by `test_sampling_triton.py`.

Checks:
  * hash: the kernel's noise equals `seeded_uniform` bit for bit (a debug kernel writes it out; and
    with all-equal logits the sampled token must be the first argmax of the reference noise);
  * match: fresh random logits, V in {1000, 151936}, T in {0, 0.7, 1.0, 1.3} mixed in each batch:
    tokens equal the reference's in >= 99.9% of rows (only float32 near-ties of the Gumbel scores
    may differ; in practice all rows agree), logprobs within 1e-4, greedy rows exactly; banned
    (-inf) tokens, including at the noise maxima, behave as in the reference;
  * dist: 40k draws at T = 1 over a 12-token vocabulary (one seed per draw) match softmax(logits):
    max |p_hat - p| < 0.01 and a chi-square p-value above 1e-4;
  * dispatch: ROLLOUT_ACCEL_SAMPLING=triton routes `sample_tokens_fast` to the kernel.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from rollout_accel.kernels import sampling
from rollout_accel.kernels import sampling_triton as st
from rollout_accel.kernels.backend import reload_overrides

# -inf - -inf in the online logsumexp is computed, then discarded by a select; numpy warns.
warnings.filterwarnings("ignore", category=RuntimeWarning)

TEMPS = (0.0, 0.7, 1.0, 1.3)
MIN_AGREEMENT = 0.999
LOGPROB_ATOL = 1e-4
FAILURES: list[str] = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    res = fn()
    return res, time.perf_counter() - t0


def random_seeds(gen: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeds over the whole int64 range (negative ones included) and steps up to 2^40."""
    seeds = torch.randint(-(2**63), 2**63 - 1, (batch,), generator=gen, dtype=torch.int64)
    steps = torch.randint(0, 2**40, (batch,), generator=gen, dtype=torch.int64)
    return seeds, steps


def reference(
    logits: torch.Tensor, temps: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    batch = logits.shape[0]
    return sampling.sample_tokens(
        logits,
        temps,
        torch.full((batch,), -1, dtype=torch.int64),
        torch.ones(batch),
        torch.zeros(batch),
        seeds,
        steps,
        need_filter=False,
    )


def compare(
    name: str,
    logits: torch.Tensor,
    temps: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
) -> None:
    """The kernel vs the reference on one batch: token agreement, logprobs, greedy rows exact."""
    batch = logits.shape[0]
    out_tok = torch.full((batch,), -1, dtype=torch.int64)
    out_lp = torch.full((batch,), float("nan"))
    (tok, lp), secs = timed(
        lambda: st.sample(logits, temps, seeds, steps, out_tokens=out_tok, out_logprobs=out_lp)
    )
    ref_tok, ref_lp = reference(logits, temps, seeds, steps)
    same = tok == ref_tok
    agreement = float(same.float().mean())
    lp_err = float((lp - ref_lp)[same].abs().nan_to_num(0.0, 0.0, 0.0).max())
    finite_ok = bool((lp.isfinite() == ref_lp.isfinite()).all())
    greedy = temps <= 0
    greedy_ok = bool((tok[greedy] == logits[greedy].argmax(-1)).all())
    ok = tok is out_tok and lp is out_lp and finite_ok and greedy_ok
    ok &= agreement >= MIN_AGREEMENT and lp_err <= LOGPROB_ATOL
    report(
        name,
        ok,
        f"agree={int(same.sum())}/{batch} max|dlogprob|={lp_err:.1e} greedy_exact={greedy_ok} "
        f"({secs:.2f}s)",
    )


def run_hash(gen: torch.Generator) -> None:
    """The noise, bit for bit, written out by the debug kernel and seen through all-equal logits."""
    for batch, vocab in ((3, 151936), (16, 1000), (5, 7)):
        seeds, steps = random_seeds(gen, batch)
        seeds[0], steps[0] = 0, 0  # the all-zero hash input
        (u, secs) = timed(
            lambda seeds=seeds, steps=steps, v=vocab: st.seeded_uniform(seeds, steps, v)
        )
        ref = sampling.seeded_uniform(seeds, steps, vocab)
        exact = torch.equal(u.view(torch.int32), ref.view(torch.int32))
        report(f"noise bit-exact B={batch} V={vocab}", exact, f"({secs:.2f}s)")

    # All-equal logits: score = c + g(u) with g increasing, so the token is the first argmax of u.
    batch, vocab = 4, 151936
    seeds, steps = random_seeds(gen, batch)
    logits = torch.full((batch, vocab), 1.5)
    temps = torch.tensor([0.7, 1.0, 1.3, 1.0])
    (tok, lp), secs = timed(lambda: st.sample(logits, temps, seeds, steps))
    want = sampling.seeded_uniform(seeds, steps, vocab).argmax(-1)
    lp_err = float((lp + torch.log(torch.tensor(float(vocab)))).abs().max())
    ok = torch.equal(tok, want) and lp_err <= LOGPROB_ATOL
    report(
        "all-equal logits pick argmax(noise)",
        ok,
        f"tokens={tok.tolist()} want={want.tolist()} |lp+log V|={lp_err:.1e} ({secs:.2f}s)",
    )


def run_match(gen: torch.Generator) -> None:
    """Fresh random logits vs the reference, greedy and sampled rows mixed in each batch."""
    for batch, vocab, scale in ((128, 1000, 3.0), (128, 1000, 8.0), (4, 151936, 3.0)):
        logits = torch.randn(batch, vocab, generator=gen) * scale
        temps = torch.tensor(TEMPS).repeat(batch // len(TEMPS))
        seeds, steps = random_seeds(gen, batch)
        compare(f"match B={batch} V={vocab} scale={scale}", logits, temps, seeds, steps)

    # A row-strided view (the sampled rows of a wider buffer) and a batch not a multiple of ROWS.
    wide = torch.randn(5, 1100, generator=gen) * 4.0
    seeds, steps = random_seeds(gen, 5)
    temps = torch.tensor([1.0, 0.0, 0.7, 1.3, 1.0])
    compare("match strided rows B=5 V=1000", wide[:, 50:1050], temps, seeds, steps)

    # Banned tokens (-inf logits, as min_new_tokens sets them), also where the noise peaks: a -inf
    # logit plus an infinite Gumbel (u == 1.0) is NaN, which torch.argmax and the kernel both pick.
    batch, vocab = 4, 151936
    seeds, steps = random_seeds(gen, batch)
    logits = torch.randn(batch, vocab, generator=gen) * 3.0
    noise_top = sampling.seeded_uniform(seeds, steps, vocab).argmax(-1)
    logits[torch.arange(batch), noise_top] = float("-inf")
    logits[:, :2] = float("-inf")
    compare("match banned tokens B=4 V=151936", logits, torch.tensor(TEMPS), seeds, steps)

    # B=1 and a vocabulary of one block; an empty batch.
    seeds, steps = random_seeds(gen, 1)
    compare("match B=1 V=2048", torch.randn(1, 2048, generator=gen), torch.ones(1), seeds, steps)
    tok, lp = st.sample(torch.zeros(0, 10), torch.ones(0), seeds[:0], steps[:0])
    report("empty batch", tok.shape == (0,) and lp.shape == (0,), "")


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit p-value (dof = categories - 1)."""
    expected = probs.double() * counts.sum()
    stat = float(((counts.double() - expected) ** 2 / expected).sum())
    dof = counts.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(stat / 2.0)))


def run_dist(gen: torch.Generator) -> None:
    """40k draws at T = 1 (the RL setting), one seed each, over 12 tokens vs softmax(logits)."""
    draws, vocab = 40_000, 12
    base = torch.randn(1, vocab, generator=gen) * 1.5
    offset = int(torch.randint(0, 2**40, (1,), generator=gen))
    seeds = torch.arange(draws, dtype=torch.int64) * 7919 + offset
    steps = torch.full((draws,), 3, dtype=torch.int64)
    for temp in (1.0,):
        logits = base.expand(draws, vocab).contiguous()
        (tok, lp), secs = timed(
            lambda logits=logits, temp=temp: st.sample(
                logits, torch.full((draws,), temp), seeds, steps
            )
        )
        probs = torch.softmax(base[0] / temp, dim=-1)
        counts = torch.bincount(tok, minlength=vocab).float()
        max_diff = float((counts / draws - probs).abs().max())
        pvalue = _chi2_pvalue(counts, probs)
        lp_err = float((lp - torch.log(probs)[tok]).abs().max())
        ok = max_diff < 0.01 and pvalue > 1e-4 and lp_err <= LOGPROB_ATOL
        report(
            f"distribution T={temp} draws={draws}",
            ok,
            f"max|p_hat-p|={max_diff:.4f} chi2 p={pvalue:.3f} max|dlogprob|={lp_err:.1e} "
            f"({secs:.2f}s)",
        )


def run_dispatch(gen: torch.Generator) -> None:
    """ROLLOUT_ACCEL_SAMPLING=triton routes CPU tensors to the (interpreted) kernel."""
    batch, vocab = 8, 300
    logits = torch.randn(batch, vocab, generator=gen) * 3.0
    temps = torch.tensor(TEMPS).repeat(2)
    seeds, steps = random_seeds(gen, batch)
    top_ks = torch.full((batch,), 5, dtype=torch.int64)
    top_ps, min_ps = torch.full((batch,), 0.5), torch.full((batch,), 0.1)
    args = (logits, temps, top_ks, top_ps, min_ps, seeds, steps)
    os.environ[sampling.ENV_VAR] = "triton"
    reload_overrides()
    backend = sampling.sampling_backend(torch.device("cpu"))
    report("dispatch forced triton", backend == "triton", f"backend={backend}")
    fast = sampling.sample_tokens_fast(*args, need_filter=False)
    kernel = st.sample(logits, temps, seeds, steps)
    same = all(torch.equal(a, b) for a, b in zip(fast, kernel, strict=True))
    report("dispatch need_filter=False -> kernel", same, "")
    fast = sampling.sample_tokens_fast(*args, need_filter=True)
    ref = sampling.sample_tokens(*args, need_filter=True)
    same = all(torch.equal(a, b) for a, b in zip(fast, ref, strict=True))
    report("dispatch need_filter=True -> reference", same, "")
    half = logits.bfloat16()
    fast = sampling.sample_tokens_fast(half, *args[1:], need_filter=False)
    kernel = st.sample(half.float(), temps, seeds, steps)
    same = all(torch.equal(a, b) for a, b in zip(fast, kernel, strict=True))
    report("dispatch bf16 logits == kernel on their exact float32 upcast", same, "")
    fast = sampling.sample_tokens_fast(logits.double(), *args[1:], need_filter=False)
    ref = sampling.sample_tokens(logits.double(), *args[1:], need_filter=False)
    same = all(torch.equal(a, b) for a, b in zip(fast, ref, strict=True))
    report("dispatch float64 logits -> reference", same, "")
    del os.environ[sampling.ENV_VAR]
    reload_overrides()


def main(argv: list[str]) -> int:
    runners = {"hash": run_hash, "match": run_match, "dist": run_dist, "dispatch": run_dispatch}
    which = argv[1:] or list(runners)
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    print(f"seed={gen.initial_seed()}")
    for name in which:
        runners[name](gen)
    print(f"{len(FAILURES)} failure(s)")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
