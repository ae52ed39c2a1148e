"""Paged attention: the reference against a naive dense attention, the Triton kernels against the
reference (CPU interpreter here, the real thing under `@pytest.mark.gpu`), and the dispatch.

Inputs are fresh random draws every run; the seed is in each failure message.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from rollout_accel.kernels import attention
from rollout_accel.kernels.backend import reload_overrides
from rollout_accel.kernels.paged_attention_reference import (
    paged_decode_attention_reference,
    paged_prefill_attention_reference,
)
from tests.kernels.interpreter import run_interpreter
from tests.kernels.paged_attention_cases import (
    PagedAttentionCase,
    dense_attention,
    make_case,
    rel_err,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
HEADS = [(4, 2), (8, 1), (4, 4)]


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def _rand_lens(gen: torch.Generator, n: int, low: int, high: int) -> list[int]:
    return torch.randint(low, high + 1, (n,), generator=gen).tolist()


def _decode_ref(case: PagedAttentionCase, upcast: bool = False) -> torch.Tensor:
    conv = (lambda t: t.float()) if upcast else (lambda t: t)
    return paged_decode_attention_reference(
        conv(case.q),
        conv(case.k_cache),
        conv(case.v_cache),
        case.block_table,
        case.seq_lens,
        case.page_size,
        case.scale,
    )


def _prefill_ref(case: PagedAttentionCase, upcast: bool = False) -> torch.Tensor:
    conv = (lambda t: t.float()) if upcast else (lambda t: t)
    return paged_prefill_attention_reference(
        conv(case.q),
        conv(case.k_cache),
        conv(case.v_cache),
        case.block_table,
        case.cu_q_lens,
        case.seq_lens,
        case.page_size,
        case.scale,
    )


# --- the oracle's oracle -------------------------------------------------------------------------


def test_dense_attention_hand_values(gen: torch.Generator) -> None:
    """One key: the output is its value. Identical keys: the mean of the visible values."""
    case = make_case([1], [1], 2, 1, 8, 1, gen=gen)
    out = dense_attention(case)
    torch.testing.assert_close(out[0], case.dense_v[0][0].double().expand(2, 8))

    case = make_case([5], [5], 2, 1, 8, 1, gen=gen)
    case.dense_k[0][:] = case.dense_k[0][0]
    out = dense_attention(case)
    values = case.dense_v[0][:, 0].double()
    for i in range(5):
        expected = values[: i + 1].mean(dim=0)
        torch.testing.assert_close(out[i, 0], expected)
        torch.testing.assert_close(out[i, 1], expected)


# --- reference vs dense --------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), HEADS)
def test_reference_decode_matches_dense(
    gen: torch.Generator, page_size: int, num_q_heads: int, num_kv_heads: int
) -> None:
    seq_lens = [1, page_size, page_size + 1, *_rand_lens(gen, 4, 1, 70)]
    case = make_case(
        seq_lens, [1] * len(seq_lens), num_q_heads, num_kv_heads, 16, page_size, gen=gen
    )
    err = rel_err(_decode_ref(case), dense_attention(case))
    assert err <= 1e-5, f"rel_err {err:.2e}, seed {gen.initial_seed()}, lens {seq_lens}"


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), HEADS)
def test_reference_prefill_matches_dense(
    gen: torch.Generator, page_size: int, num_q_heads: int, num_kv_heads: int
) -> None:
    # Full prefill, prefix-cached chunks, a decode-like row, and a row with no new tokens.
    seq_lens = [23, 40, 9, 12, *_rand_lens(gen, 3, 1, 60)]
    q_lens = [23, 17, 1, 0]
    q_lens += [int(torch.randint(1, sl + 1, (), generator=gen)) for sl in seq_lens[4:]]
    case = make_case(seq_lens, q_lens, num_q_heads, num_kv_heads, 16, page_size, gen=gen)
    err = rel_err(_prefill_ref(case), dense_attention(case))
    assert err <= 1e-5, f"rel_err {err:.2e}, seed {gen.initial_seed()}, {seq_lens=} {q_lens=}"


def test_reference_bf16_within_bf16_error(gen: torch.Generator) -> None:
    seq_lens = _rand_lens(gen, 4, 1, 80)
    case = make_case(seq_lens, [1] * 4, 8, 2, 32, 16, torch.bfloat16, gen=gen)
    err = rel_err(_decode_ref(case), dense_attention(case))
    assert err <= 1e-2, f"rel_err {err:.2e}, seed {gen.initial_seed()}"


def test_reference_decode_equals_prefill_with_one_token(gen: torch.Generator) -> None:
    seq_lens = _rand_lens(gen, 5, 1, 50)
    case = make_case(seq_lens, [1] * 5, 4, 2, 16, 16, gen=gen)
    err = rel_err(_decode_ref(case), _prefill_ref(case))
    assert err <= 1e-6, f"rel_err {err:.2e}, seed {gen.initial_seed()}"


# --- dispatch ------------------------------------------------------------------------------------


def test_dispatch_reference_writes_out(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(attention.ENV_VAR, raising=False)
    reload_overrides()
    case = make_case([7, 20], [1, 1], 4, 2, 16, 1, gen=gen)
    out = torch.full_like(case.q, float("nan"))
    res = attention.decode_attention(
        case.q, case.k_cache, case.v_cache, case.block_table, case.seq_lens, 1, case.scale, out
    )
    assert res is out
    assert rel_err(out, dense_attention(case)) <= 1e-5

    case = make_case([7, 20], [3, 20], 4, 2, 16, 16, gen=gen)
    out = torch.full_like(case.q, float("nan"))
    res = attention.prefill_attention(
        case.q,
        case.k_cache,
        case.v_cache,
        case.block_table,
        case.cu_q_lens,
        case.seq_lens,
        16,
        case.scale,
        out=out,
    )
    assert res is out
    assert rel_err(out, dense_attention(case)) <= 1e-5


# --- Triton under the CPU interpreter ------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("part", ["decode", "prefill", "dispatch"])
def test_triton_kernels_under_interpreter(part: str) -> None:
    """The interpreter must be switched on before triton is imported, so it runs in a subprocess."""
    proc = run_interpreter(
        "tests.kernels.paged_attention_interpret", part, drop_env=attention.ENV_VAR
    )
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert "0 failure(s)" in proc.stdout


# --- Triton on the GPU ---------------------------------------------------------------------------

GPU_DTYPES = [torch.bfloat16, torch.float16]


def _triton():
    from rollout_accel.kernels import paged_attention_triton

    return paged_attention_triton


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize(
    ("batch", "max_len", "num_q_heads", "num_kv_heads", "head_dim", "page_size", "num_splits"),
    [
        (1, 4000, 16, 8, 128, 1, None),
        (3, 300, 16, 8, 128, 16, None),
        (64, 600, 16, 8, 128, 1, None),
        (256, 200, 16, 8, 128, 1, None),
        (5, 2000, 32, 4, 64, 16, None),
        (7, 500, 8, 8, 64, 1, 5),
        (4, 700, 28, 4, 128, 32, 16),
        (9, 100, 16, 2, 96, 16, 3),
        (2, 33000, 16, 8, 128, 1, None),
    ],
)
def test_gpu_decode_matches_reference(
    gen: torch.Generator,
    dtype: torch.dtype,
    batch: int,
    max_len: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    num_splits: int | None,
) -> None:
    seq_lens = _rand_lens(gen, batch, 1, max_len)
    seq_lens[0] = max_len
    case = make_case(
        seq_lens,
        [1] * batch,
        num_q_heads,
        num_kv_heads,
        head_dim,
        page_size,
        dtype,
        gen=gen,
        device="cuda",
    )
    out = torch.full_like(case.q, float("nan"))
    _triton().paged_decode_attention(
        case.q,
        case.k_cache,
        case.v_cache,
        case.block_table,
        case.seq_lens,
        page_size,
        case.scale,
        out,
        num_splits=num_splits,
    )
    assert torch.isfinite(out).all(), f"unwritten or NaN output, seed {gen.initial_seed()}"
    err = rel_err(out, _decode_ref(case, upcast=True))
    assert err <= 1e-2, f"rel_err {err:.2e}, seed {gen.initial_seed()}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize(
    ("seq_lens", "q_lens", "num_q_heads", "num_kv_heads", "head_dim", "page_size"),
    [
        ([512] * 8, [512] * 8, 16, 8, 128, 1),
        ([700, 300, 1000], [200, 300, 37], 16, 8, 128, 16),
        ([129, 1, 64, 2048], [129, 1, 1, 1000], 16, 8, 128, 1),
        ([333, 90], [333, 0], 32, 4, 64, 16),
        ([260, 517], [100, 517], 8, 8, 96, 1),
    ],
)
def test_gpu_prefill_matches_reference(
    gen: torch.Generator,
    dtype: torch.dtype,
    seq_lens: list[int],
    q_lens: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
) -> None:
    case = make_case(
        seq_lens,
        q_lens,
        num_q_heads,
        num_kv_heads,
        head_dim,
        page_size,
        dtype,
        gen=gen,
        device="cuda",
    )
    out = torch.full_like(case.q, float("nan"))
    _triton().paged_prefill_attention(
        case.q,
        case.k_cache,
        case.v_cache,
        case.block_table,
        case.cu_q_lens,
        case.seq_lens,
        page_size,
        case.scale,
        case.max_q_len,
        out,
    )
    assert torch.isfinite(out).all(), f"unwritten or NaN output, seed {gen.initial_seed()}"
    err = rel_err(out, _prefill_ref(case, upcast=True))
    assert err <= 1e-2, f"rel_err {err:.2e}, seed {gen.initial_seed()}"


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 8])
def test_gpu_decode_cuda_graph_replay(gen: torch.Generator, num_splits: int | None) -> None:
    """Capture once, then replay with new queries and new lengths written into the same buffers."""
    tri = _triton()
    batch, max_len = 4, 3000
    case = make_case(
        [max_len] * batch, [1] * batch, 16, 8, 128, 1, torch.bfloat16, gen=gen, device="cuda"
    )
    q = case.q.clone()
    seq_lens = case.seq_lens.clone()
    out = torch.empty_like(q)

    def step() -> None:
        tri.paged_decode_attention(
            q,
            case.k_cache,
            case.v_cache,
            case.block_table,
            seq_lens,
            1,
            case.scale,
            out,
            num_splits=num_splits,
        )

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        new_lens = torch.randint(1, max_len + 1, (batch,), generator=gen).to(torch.int32)
        seq_lens.copy_(new_lens)
        q.copy_(torch.randn(q.shape, generator=gen).to(q.dtype))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = paged_decode_attention_reference(
            q.float(),
            case.k_cache.float(),
            case.v_cache.float(),
            case.block_table,
            seq_lens,
            1,
            case.scale,
        )
        err = rel_err(out, ref)
        assert torch.isfinite(out).all() and err <= 1e-2, f"rel_err {err:.2e}"


@pytest.mark.gpu
def test_gpu_decode_zero_length_rows_write_zeros(gen: torch.Generator) -> None:
    """Rows with seq_len 0 (CUDA-graph padding) come out as zeros, not NaN."""
    case = make_case([0, 50, 0, 900], [0, 1, 0, 1], 16, 8, 128, 1, torch.bfloat16, gen=gen)
    q = torch.randn((4, 16, 128), generator=gen).to(torch.bfloat16).cuda()
    args = (case.k_cache.cuda(), case.v_cache.cuda(), case.block_table.cuda(), case.seq_lens.cuda())
    ref = paged_decode_attention_reference(
        q.float(), args[0].float(), args[1].float(), *args[2:], 1, case.scale
    )
    for splits in (1, 4):
        out = torch.full_like(q, float("nan"))
        _triton().paged_decode_attention(q, *args, 1, case.scale, out, num_splits=splits)
        assert (out[0] == 0).all() and (out[2] == 0).all()
        err = rel_err(out[[1, 3]], ref[[1, 3]])
        assert err <= 1e-2, f"rel_err {err:.2e}, seed {gen.initial_seed()}"


# --- input validation ----------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_wrappers_reject_bad_inputs(gen: torch.Generator) -> None:
    tri = _triton()
    case = make_case([5, 9], [1, 1], 4, 2, 16, 1, gen=gen)
    args = (case.k_cache, case.v_cache, case.block_table, case.seq_lens, 1, case.scale)
    with pytest.raises(ValueError, match="multiple"):
        tri.paged_decode_attention(case.q[:, :3], *args)
    with pytest.raises(ValueError, match="dtype"):
        tri.paged_decode_attention(case.q.half(), *args)
    with pytest.raises(ValueError, match="seq_lens"):
        tri.paged_decode_attention(case.q, *args[:3], case.seq_lens[:1], 1, case.scale)
    with pytest.raises(ValueError, match="out"):
        tri.paged_decode_attention(case.q, *args, torch.empty(2, 4, 8))
    with pytest.raises(ValueError, match="cu_q_lens"):
        tri.paged_prefill_attention(
            case.q, *args[:3], case.cu_q_lens[:2], case.seq_lens, 1, case.scale
        )
