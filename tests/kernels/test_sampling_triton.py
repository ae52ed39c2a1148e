"""The one-pass Triton sampler (`kernels.sampling_triton`) against the torch sampler.

On the CPU: the dispatch (`sample_tokens_fast`), input validation, the kernel under Triton's
interpreter (a subprocess: noise bit-exact, tokens and logprobs vs the reference, the empirical
distribution), and the kernel compiled for sm_90 (no spills, 16-byte loads). On a GPU
(`@pytest.mark.gpu`): the same checks on CUDA, CUDA-graph replay, and a timing print (run with -s).

Inputs are fresh random draws every run; the seed is in each failure message.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from rollout_accel.kernels import sampling
from rollout_accel.kernels.backend import reload_overrides
from tests.kernels.interpreter import run_interpreter

REPO_ROOT = Path(__file__).resolve().parents[2]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
QWEN_VOCAB = 151936
TEMPS = (0.0, 0.7, 1.0, 1.3)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def _seeds(
    gen: torch.Generator, batch: int, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    seeds = torch.randint(-(2**63), 2**63 - 1, (batch,), generator=gen, dtype=torch.int64)
    steps = torch.randint(0, 2**40, (batch,), generator=gen, dtype=torch.int64)
    return seeds.to(device), steps.to(device)


def _filters(batch: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """top_ks, top_ps, min_ps that filter nothing."""
    return (
        torch.full((batch,), -1, dtype=torch.int64, device=device),
        torch.ones(batch, device=device),
        torch.zeros(batch, device=device),
    )


# --- dispatch ------------------------------------------------------------------------------------


@pytest.mark.parametrize("need_filter", [False, True])
def test_fast_equals_reference_on_cpu(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch, need_filter: bool
) -> None:
    """On CPU tensors `sample_tokens_fast` is `sample_tokens`, bit for bit."""
    monkeypatch.delenv(sampling.ENV_VAR, raising=False)
    reload_overrides()
    batch, vocab = 8, 500
    logits = torch.randn(batch, vocab, generator=gen) * 3
    temps = torch.tensor(TEMPS).repeat(2)
    seeds, steps = _seeds(gen, batch)
    top_ks = torch.tensor([-1, 5, 0, 50, -1, 1, 600, 3])
    top_ps, min_ps = torch.full((batch,), 0.8), torch.full((batch,), 0.05)
    args = (logits, temps, top_ks, top_ps, min_ps, seeds, steps)
    got = sampling.sample_tokens_fast(*args, need_filter=need_filter)
    want = sampling.sample_tokens(*args, need_filter=need_filter)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


# --- the kernel: constants, validation, CPU interpreter ------------------------------------------


@needs_triton
def test_kernel_constants_are_the_reference_hash() -> None:
    from rollout_accel.kernels import sampling_triton as st

    mask = (1 << 64) - 1
    pairs = [
        (st.C_SEED, sampling._C_SEED),
        (st.C_STEP, sampling._C_STEP),
        (st.C_TOKEN, sampling._C_TOKEN),
        (st.MIX1, sampling._MIX1),
        (st.MIX2, sampling._MIX2),
    ]
    for kernel_const, ref_const in pairs:
        value = kernel_const.value
        assert 2**63 <= value < 2**64  # typed uint64 by Triton: products wrap mod 2^64
        assert value == ref_const & mask


@needs_triton
def test_wrapper_rejects_bad_inputs(gen: torch.Generator) -> None:
    from rollout_accel.kernels import sampling_triton as st

    logits = torch.randn(4, 64, generator=gen)
    temps = torch.ones(4)
    seeds, steps = _seeds(gen, 4)
    with pytest.raises(ValueError, match="float32"):
        st.sample(logits.double(), temps, seeds, steps)
    with pytest.raises(ValueError, match="contiguous in V"):
        st.sample(logits.t(), temps, seeds, steps)
    with pytest.raises(ValueError, match="temperatures"):
        st.sample(logits, temps[:3], seeds, steps)
    with pytest.raises(ValueError, match="seeds"):
        st.sample(logits, temps, seeds.float(), steps)
    with pytest.raises(ValueError, match="out_tokens"):
        st.sample(logits, temps, seeds, steps, out_tokens=torch.empty(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="vocab"):
        st.sample(logits[:, :0], temps, seeds, steps)


@needs_triton
def test_triton_kernel_under_interpreter() -> None:
    """The interpreter must be on before triton is imported, so it runs in a subprocess."""
    proc = run_interpreter("tests.kernels.sampling_interpret", drop_env=sampling.ENV_VAR)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert "0 failure(s)" in proc.stdout


# --- compiled for Hopper (sm_90) on the CPU ------------------------------------------------------


def _compile_sample(monkeypatch: pytest.MonkeyPatch, batch: int, vocab: int) -> Any:
    sm90 = pytest.importorskip("tests.kernels.sm90_compile", reason="needs triton's compiler API")
    if not sm90.tools_available():
        pytest.skip("no bundled ptxas/cuobjdump")
    from rollout_accel.kernels import sampling_triton as st

    monkeypatch.setitem(sm90._PTR, torch.int64, "*i64")  # seeds, steps, tokens
    block, rows, warps = st.launch_config(batch, vocab)
    args = {
        "logits_ptr": torch.float32,
        "temp_ptr": torch.float32,
        "seed_ptr": torch.int64,
        "step_ptr": torch.int64,
        "tok_ptr": torch.int64,
        "lp_ptr": torch.float32,
        "stride_row": vocab,
        "batch": batch,
        "vocab": vocab,
    }
    return sm90.compile_sm90(st._sample_kernel, args, {"ROWS": rows, "BLOCK": block}, warps, 1)


@needs_triton
def test_sm90_sampler_compiles_lean(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode config (B=256, Qwen vocab): no spills, 16-byte loads, and at most 64 registers so
    two 16-warp row programs fit on an SM (256 rows on 132 SMs run in one wave)."""
    rep = _compile_sample(monkeypatch, 256, QWEN_VOCAB)
    assert not rep.spills, rep
    assert rep.sass_counts["LDG.E.128"] > 0, rep
    assert rep.registers <= 64, rep


# --- on the GPU ----------------------------------------------------------------------------------


def _st() -> Any:
    from rollout_accel.kernels import sampling_triton

    return sampling_triton


def _reference(
    logits: torch.Tensor, temps: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return sampling.sample_tokens(
        logits, temps, *_filters(logits.shape[0], "cuda"), seeds, steps, need_filter=False
    )


@pytest.mark.gpu
@pytest.mark.parametrize(("batch", "vocab"), [(4, QWEN_VOCAB), (64, 1000), (3, 7)])
def test_gpu_noise_bit_exact(gen: torch.Generator, batch: int, vocab: int) -> None:
    seeds, steps = _seeds(gen, batch, "cuda")
    got = _st().seeded_uniform(seeds, steps, vocab)
    want = sampling.seeded_uniform(seeds, steps, vocab)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32)), f"seed {gen.initial_seed()}"


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("vocab", "scale", "bf16_logits"),
    [(QWEN_VOCAB, 3.0, False), (QWEN_VOCAB, 3.0, True), (1000, 8.0, False)],
    ids=str,
)
def test_gpu_matches_reference(
    gen: torch.Generator, vocab: int, scale: float, bf16_logits: bool
) -> None:
    """2048 rows in 8 batches of 256, T in {0, 0.7, 1, 1.3} mixed: >= 99.9% same tokens (float32
    near-ties of the Gumbel scores may differ), logprobs within 1e-4, greedy rows exact.

    bf16_logits: logits rounded to bfloat16 first, as an lm_head in bf16 produces (many ties).
    """
    rows = agree = 0
    lp_err = 0.0
    for _ in range(8):
        logits = torch.randn(256, vocab, generator=gen) * scale
        if bf16_logits:
            logits = logits.bfloat16().float()
        logits = logits.cuda()
        temps = torch.tensor(TEMPS).repeat(64).cuda()
        seeds, steps = _seeds(gen, 256, "cuda")
        tok, lp = _st().sample(logits, temps, seeds, steps)
        ref_tok, ref_lp = _reference(logits, temps, seeds, steps)
        same = tok == ref_tok
        rows += 256
        agree += int(same.sum())
        lp_err = max(lp_err, float((lp - ref_lp)[same].abs().max()))
        greedy = temps <= 0
        assert torch.equal(tok[greedy], logits[greedy].argmax(-1)), f"seed {gen.initial_seed()}"
    msg = f"agree {agree}/{rows}, max |dlogprob| {lp_err:.1e}, seed {gen.initial_seed()}"
    assert agree >= 0.999 * rows and lp_err <= 1e-4, msg


@pytest.mark.gpu
def test_gpu_banned_tokens_match_reference(gen: torch.Generator) -> None:
    """-inf logits (min_new_tokens bans), also at each row's noise maximum, as the reference."""
    batch = 256
    logits = (torch.randn(batch, QWEN_VOCAB, generator=gen) * 3).cuda()
    seeds, steps = _seeds(gen, batch, "cuda")
    top = sampling.seeded_uniform(seeds, steps, QWEN_VOCAB).argmax(-1)
    logits[torch.arange(batch, device="cuda"), top] = float("-inf")
    logits[:, :2] = float("-inf")
    temps = torch.tensor(TEMPS).repeat(64).cuda()
    tok, lp = _st().sample(logits, temps, seeds, steps)
    ref_tok, ref_lp = _reference(logits, temps, seeds, steps)
    assert float((tok == ref_tok).float().mean()) >= 0.99, f"seed {gen.initial_seed()}"
    assert torch.equal(lp.isfinite(), ref_lp.isfinite())


@pytest.mark.gpu
@pytest.mark.parametrize("temp", [0.7, 1.0, 1.3])
def test_gpu_distribution(gen: torch.Generator, temp: float) -> None:
    """40k draws (one seed each) over 12 tokens: max |p_hat - p| < 0.01 vs softmax(logits / T)."""
    draws, vocab = 40_000, 12
    base = torch.randn(1, vocab, generator=gen) * 1.5
    logits = base.expand(draws, vocab).contiguous().cuda()
    seeds = torch.arange(draws, dtype=torch.int64, device="cuda") * 7919 + gen.initial_seed()
    steps = torch.full((draws,), 5, dtype=torch.int64, device="cuda")
    tok, lp = _st().sample(logits, torch.full((draws,), temp, device="cuda"), seeds, steps)
    probs = torch.softmax(base[0] / temp, dim=-1)
    p_hat = torch.bincount(tok.cpu(), minlength=vocab).float() / draws
    assert float((p_hat - probs).abs().max()) < 0.01, f"seed {gen.initial_seed()}"
    assert float((lp.cpu() - torch.log(probs)[tok.cpu()]).abs().max()) < 1e-4


@pytest.mark.gpu
def test_gpu_cuda_graph_replay(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """`sample_tokens_fast` captured once, replayed on new logits/temperatures/seeds/steps."""
    monkeypatch.delenv(sampling.ENV_VAR, raising=False)
    reload_overrides()
    batch = 64
    logits = torch.empty(batch, QWEN_VOCAB, device="cuda")
    temps = torch.empty(batch, device="cuda")
    seeds = torch.empty(batch, dtype=torch.int64, device="cuda")
    steps = torch.empty_like(seeds)
    filters = _filters(batch, "cuda")

    def fill() -> None:
        logits.copy_(torch.randn(batch, QWEN_VOCAB, generator=gen) * 3)
        temps.copy_(torch.tensor(TEMPS).repeat(batch // 4)[torch.randperm(batch, generator=gen)])
        new_seeds, new_steps = _seeds(gen, batch)
        seeds.copy_(new_seeds)
        steps.copy_(new_steps)

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        return sampling.sample_tokens_fast(logits, temps, *filters, seeds, steps, need_filter=False)

    fill()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tok, lp = step()
    for _ in range(3):
        fill()
        graph.replay()
        torch.cuda.synchronize()
        eager_tok, eager_lp = _st().sample(logits, temps, seeds, steps)
        assert torch.equal(tok, eager_tok) and torch.equal(lp, eager_lp)
        ref_tok, _ = _reference(logits, temps, seeds, steps)
        assert float((tok == ref_tok).float().mean()) >= 0.98, f"seed {gen.initial_seed()}"
