"""Verify attention: the reference against a dense float64 attention and the prefill reference,
the Triton kernel against the reference (CPU interpreter; the real thing under `gpu`)."""

from __future__ import annotations

import os

import pytest
import torch

from rollout_accel.kernels import attention
from rollout_accel.kernels.paged_attention_reference import paged_prefill_attention_reference
from rollout_accel.kernels.verify_attention import verify_attention
from rollout_accel.kernels.verify_attention_reference import paged_verify_attention_reference
from tests.kernels.interpreter import run_interpreter
from tests.kernels.paged_attention_cases import rel_err
from tests.kernels.verify_attention_cases import dense_verify, make_verify_case


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


@pytest.mark.parametrize("heads", [(4, 2), (8, 1), (4, 4)])
@pytest.mark.parametrize("page_size", [1, 16])
def test_reference_matches_dense(gen: torch.Generator, heads: tuple[int, int], page_size: int):
    seq_lens = torch.randint(5, 60, (5,), generator=gen).tolist()
    q_lens = [int(torch.randint(0, 6, (1,), generator=gen)) for _ in seq_lens]
    case = make_verify_case(seq_lens, q_lens, *heads, 16, page_size, gen=gen, pad=2)
    out = paged_verify_attention_reference(case.q, *case.args(), max(case.max_q_len, 5))
    err = rel_err(out, dense_verify(case))
    assert err < 1e-5, f"seed={gen.initial_seed()} rel_err={err}"


def test_reference_equals_prefill_reference(gen: torch.Generator) -> None:
    """Verify rows are extend rows: the prefill reference computes the same thing."""
    case = make_verify_case([30, 12, 44, 9], [4, 1, 3, 1], 4, 2, 32, 1, gen=gen)
    b = case.base
    out = paged_verify_attention_reference(case.q, *case.args(), 4)
    ref = paged_prefill_attention_reference(
        b.q, b.k_cache, b.v_cache, b.block_table, b.cu_q_lens, b.seq_lens, 1, b.scale
    )
    assert torch.allclose(out, ref, atol=1e-6, rtol=1e-5)


def test_dispatch_uses_reference_on_cpu(gen: torch.Generator, monkeypatch) -> None:
    monkeypatch.delenv(attention.ENV_VAR, raising=False)
    case = make_verify_case([10, 20], [2, 3], 4, 2, 16, 1, gen=gen)
    out = torch.empty_like(case.q)
    got = verify_attention(case.q, *case.args(), 3, out=out)
    assert got is out
    assert torch.equal(out, paged_verify_attention_reference(case.q, *case.args(), 3))


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="a GPU runs the compiled kernel against the reference (the gpu tests above); "
    "Triton 3.6's interpreter cannot run this kernel's loaded loop bounds",
)
def test_triton_kernel_under_interpreter() -> None:
    proc = run_interpreter("tests.kernels.verify_attention_interpret", drop_env=attention.ENV_VAR)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert "0 failure(s)" in proc.stdout


# --- on the GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("num_splits", [None, 1, 4])
def test_gpu_verify_matches_reference(gen, dtype: torch.dtype, num_splits: int | None) -> None:
    from rollout_accel.kernels.verify_attention_triton import paged_verify_attention

    seq_lens = torch.randint(9, 3000, (24,), generator=gen).tolist()
    q_lens = torch.randint(1, 9, (24,), generator=gen).tolist()
    case = make_verify_case(seq_lens, q_lens, 16, 8, 128, 16, dtype, gen=gen, device="cuda")
    out = paged_verify_attention(case.q, *case.args(), 8, num_splits=num_splits)
    ref = paged_verify_attention_reference(
        case.q.float(),
        case.base.k_cache.float(),
        case.base.v_cache.float(),
        *case.args()[2:],
        8,
    )
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert rel_err(out, ref) < tol, f"seed={gen.initial_seed()}"


@pytest.mark.gpu
def test_gpu_verify_cuda_graph_replay(gen: torch.Generator) -> None:
    """Captured once with a fixed stride (6 queries per row), replayed with new lengths and
    queries: the same answer as an eager call."""
    from rollout_accel.kernels.verify_attention_triton import paged_verify_attention

    rows, stride = 32, 6
    case = make_verify_case(
        [200] * rows, [stride] * rows, 16, 8, 128, 1, torch.bfloat16, gen=gen, device="cuda"
    )
    args = list(case.args())
    out = torch.empty_like(case.q)
    paged_verify_attention(case.q, *args, stride, out)  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_verify_attention(case.q, *args, stride, out)
    new_seq = torch.randint(10, 201, (rows,), generator=gen).to(torch.int32)
    case.q.copy_(torch.randn(case.q.shape, generator=gen).to(case.q))
    args[4].copy_(new_seq.cuda())
    graph.replay()
    eager = paged_verify_attention(case.q, *args, stride)
    assert torch.equal(out, eager)
