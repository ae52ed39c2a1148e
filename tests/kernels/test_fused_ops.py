"""Fused decoder-layer ops: the references against Hugging Face's own modules, the dispatch, the
Triton kernels under the CPU interpreter and compiled for sm_90, and the real thing on a GPU
(`@pytest.mark.gpu`: correctness, CUDA-graph replay, and a timing print, run with -s to see it).

Inputs are fresh random draws every run; the seed is in each failure message.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from rollout_accel.kernels import fused_ops
from rollout_accel.kernels.backend import reload_overrides
from tests.kernels.interpreter import run_interpreter

REPO_ROOT = Path(__file__).resolve().parents[2]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def _rope_tables(
    gen: torch.Generator, tokens: int, head_dim: int, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [tokens, head_dim] float32 in HF layout (cat(freqs, freqs)) at random positions."""
    positions = torch.randint(0, 40000, (tokens,), generator=gen).float()
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


def _weight(
    gen: torch.Generator, size: int, dtype: torch.dtype, device: str = "cpu"
) -> torch.Tensor:
    return (1.0 + 0.2 * torch.randn(size, generator=gen)).to(dtype).to(device)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives NaN (which fails any <= check)."""
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def _ulp_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| in ulps (machine epsilon) of max |ref|."""
    scale = ref.double().abs().max() * torch.finfo(ref.dtype).eps
    return float((out.double() - ref.double()).abs().max() / scale)


# --- the oracle's oracle: the references are Hugging Face's modules, bit for bit ----------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_references_equal_transformers(gen: torch.Generator, dtype: torch.dtype) -> None:
    pytest.importorskip("transformers")
    from transformers.activations import ACT2FN
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb

    t, hq, hkv, d, h, eps = 5, 4, 2, 64, 256, 1e-6
    norm = Qwen3RMSNorm(h, eps=eps).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(_weight(gen, h, dtype))
        x = (3 * torch.randn(t, h, generator=gen)).to(dtype)
        res = torch.randn(t, h, generator=gen).to(dtype)
        assert torch.equal(fused_ops.rms_norm_reference(x, norm.weight, eps), norm(x))
        normed, new_res = fused_ops.add_rms_norm_reference(x, res, norm.weight, eps)
        assert torch.equal(new_res, res + x) and torch.equal(normed, norm(res + x))

        q_norm, k_norm = Qwen3RMSNorm(d, eps=eps).to(dtype), Qwen3RMSNorm(d, eps=eps).to(dtype)
        q_norm.weight.copy_(_weight(gen, d, dtype))
        k_norm.weight.copy_(_weight(gen, d, dtype))
        q = torch.randn(t, hq, d, generator=gen).to(dtype)
        k = torch.randn(t, hkv, d, generator=gen).to(dtype)
        cos, sin = _rope_tables(gen, t, d)
        # HF: the rotary module returns cos/sin already cast to the activations' dtype.
        want = apply_rotary_pos_emb(
            q_norm(q), k_norm(k), cos.to(dtype), sin.to(dtype), unsqueeze_dim=1
        )
        got = fused_ops.qk_norm_rope_reference(q, k, cos, sin, q_norm.weight, k_norm.weight, eps)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

        gate, up = torch.randn(t, h, generator=gen).to(dtype), torch.randn(t, h, generator=gen)
        up = up.to(dtype)
        assert torch.equal(fused_ops.silu_and_mul_reference(gate, up), ACT2FN["silu"](gate) * up)


def test_reference_rope_is_a_rotation(gen: torch.Generator) -> None:
    """Rotary on pairs (x_i, x_{i+D/2}) is multiplication by e^{i theta} in float64."""
    t, d = 6, 32
    q, k = (
        torch.randn(t, 3, d, generator=gen).double(),
        torch.randn(t, 1, d, generator=gen).double(),
    )
    cos, sin = _rope_tables(gen, t, d)
    cos, sin = cos.double(), sin.double()
    q_out, _ = fused_ops.qk_norm_rope_reference(q, k, cos, sin)
    z = torch.complex(q[..., : d // 2], q[..., d // 2 :])
    rot = torch.polar(torch.ones_like(cos[:, : d // 2]), torch.atan2(sin, cos)[:, : d // 2])
    want = z * rot[:, None, :]
    torch.testing.assert_close(q_out, torch.cat((want.real, want.imag), dim=-1))


# --- dispatch ------------------------------------------------------------------------------------


def test_dispatch_reference_path_on_cpu(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(fused_ops.ENV_VAR, raising=False)
    reload_overrides()
    x, res, w = (
        torch.randn(3, 64, generator=gen),
        torch.randn(3, 64, generator=gen),
        _weight(gen, 64, torch.float32),
    )
    assert torch.equal(fused_ops.rms_norm(x, w, 1e-5), fused_ops.rms_norm_reference(x, w, 1e-5))
    got, want = (
        fused_ops.add_rms_norm(x, res, w, 1e-5),
        (fused_ops.add_rms_norm_reference(x, res, w, 1e-5)),
    )
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    qkv = torch.randn(3, 4 * 16, generator=gen)
    q, k = qkv[:, :32].view(3, 2, 16), qkv[:, 32:48].view(3, 1, 16)
    cos, sin = _rope_tables(gen, 3, 16)
    q_out, k_out = fused_ops.qk_norm_rope(q, k, cos, sin, w[:16], w[16:32])
    assert q_out.is_contiguous() and k_out.is_contiguous()
    want = fused_ops.qk_norm_rope_reference(q, k, cos, sin, w[:16], w[16:32])
    assert torch.equal(q_out, want[0]) and torch.equal(k_out, want[1])
    assert torch.equal(fused_ops.silu_and_mul(x, res), fused_ops.silu_and_mul_reference(x, res))


# --- Triton under the CPU interpreter ------------------------------------------------------------


@needs_triton
def test_triton_kernels_under_interpreter() -> None:
    """The interpreter must be switched on before triton is imported, so it runs in a subprocess.

    One process for all parts (rows, qk, silu, dispatch) to pay the torch/triton import once.
    """
    proc = run_interpreter("tests.kernels.fused_ops_interpret", drop_env=fused_ops.ENV_VAR)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert "0 failure(s)" in proc.stdout


# --- input validation ----------------------------------------------------------------------------


@needs_triton
def test_triton_wrappers_reject_bad_inputs(gen: torch.Generator) -> None:
    from rollout_accel.kernels import fused_ops_triton as ft

    x = torch.randn(4, 64, generator=gen)
    w = torch.ones(64)
    with pytest.raises(ValueError, match="weight"):
        ft.rms_norm(x, torch.ones(32), 1e-6)
    with pytest.raises(ValueError, match="dtype"):
        ft.rms_norm(x.double(), w.double(), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        ft.add_rms_norm(x, x.half(), w, 1e-6)
    with pytest.raises(ValueError, match="out"):
        ft.rms_norm(x, w, 1e-6, out=torch.empty(4, 32))
    q, k = torch.randn(2, 4, 64), torch.randn(2, 2, 64)
    cos, sin = torch.ones(2, 64), torch.zeros(2, 64)
    with pytest.raises(ValueError, match="k"):
        ft.qk_norm_rope(q, k[..., :32], cos, sin)
    with pytest.raises(ValueError, match="contiguous in head_dim"):
        ft.qk_norm_rope(q.transpose(1, 2), k, cos, sin)
    with pytest.raises(ValueError, match="cos"):
        ft.qk_norm_rope(q, k, cos[:1], sin)
    with pytest.raises(ValueError, match="q_weight"):
        ft.qk_norm_rope(q, k, cos, sin, w.half(), None)
    with pytest.raises(ValueError, match="even"):
        ft.qk_norm_rope(q[..., :63], k[..., :63], cos[:, :63], sin[:, :63])
    with pytest.raises(ValueError, match="gate"):
        ft.silu_and_mul(x, x[:, :32])


# --- compiled for Hopper (sm_90) on the CPU ------------------------------------------------------


def _sm90() -> Any:
    sm90 = pytest.importorskip("tests.kernels.sm90_compile", reason="needs triton's compiler API")
    if not sm90.tools_available():
        pytest.skip("no bundled ptxas/cuobjdump")
    return sm90


def _compile_rows(sm90: Any, dtype: torch.dtype, hidden: int, residual: bool) -> Any:
    import triton

    from rollout_accel.kernels import fused_ops_triton as ft

    block = triton.next_power_of_2(hidden)
    args = {
        "x_ptr": dtype,
        "res_ptr": dtype,
        "w_ptr": dtype,
        "out_ptr": dtype,
        "res_out_ptr": dtype,
        "stride_x": hidden,
        "stride_r": hidden,
        "eps": 1e-6,
    }
    constexprs = {"H": hidden, "BLOCK_H": block, "HAS_RESIDUAL": residual}
    warps = ft._num_warps(block, dtype.itemsize, 16)
    return sm90.compile_sm90(ft._rms_norm_kernel, args, constexprs, warps, 1)


def _compile_qk(sm90: Any, dtype: torch.dtype, hq: int, hkv: int, head_dim: int) -> Any:
    import triton

    from rollout_accel.kernels import fused_ops_triton as ft

    half = head_dim // 2
    row = (hq + 2 * hkv) * head_dim  # q and k as column slices of a fused qkv projection
    args = {
        "q_ptr": dtype,
        "k_ptr": dtype,
        "cos_ptr": torch.float32,
        "sin_ptr": torch.float32,
        "q_w_ptr": dtype,
        "k_w_ptr": dtype,
        "q_out_ptr": dtype,
        "k_out_ptr": dtype,
        "stride_qt": row,
        "stride_qh": head_dim,
        "stride_kt": row,
        "stride_kh": head_dim,
        "stride_ct": head_dim,
        "stride_st": head_dim,
        "eps": 1e-6,
    }
    block_q, block_half = triton.next_power_of_2(hq), triton.next_power_of_2(half)
    constexprs = {
        "NUM_Q_HEADS": hq,
        "NUM_KV_HEADS": hkv,
        "BLOCK_Q_HEADS": block_q,
        "BLOCK_KV_HEADS": triton.next_power_of_2(hkv),
        "HALF": half,
        "BLOCK_HALF": block_half,
        "Q_NORM": True,
        "K_NORM": True,
    }
    warps = ft._num_warps(block_q * block_half, dtype.itemsize, 8)
    return sm90.compile_sm90(ft._qk_norm_rope_kernel, args, constexprs, warps, 1)


def _compile_silu(sm90: Any, dtype: torch.dtype, inter: int) -> Any:
    from rollout_accel.kernels import fused_ops_triton as ft

    args = {
        "gate_ptr": dtype,
        "up_ptr": dtype,
        "out_ptr": dtype,
        "stride_g": 2 * inter,  # halves of a fused gate_up projection
        "stride_u": 2 * inter,
        "n_cols": inter,
    }
    block = ft.SILU_BLOCK
    warps = ft._num_warps(block, dtype.itemsize, 8)
    return sm90.compile_sm90(ft._silu_and_mul_kernel, args, {"BLOCK": block}, warps, 1)


@needs_triton
@pytest.mark.parametrize(
    ("hidden", "residual"), [(1024, False), (1024, True), (16384, True)], ids=str
)
def test_sm90_rows_compile_lean(hidden: int, residual: bool) -> None:
    """No spills up to MAX_HIDDEN; 16-byte loads."""
    rep = _compile_rows(_sm90(), torch.bfloat16, hidden, residual)
    assert not rep.spills, rep
    assert rep.sass_counts["LDG.E.128"] > 0, rep


@needs_triton
@pytest.mark.parametrize("head_dim", [128, 64])
def test_sm90_qk_norm_rope_compiles_lean(head_dim: int) -> None:
    rep = _compile_qk(_sm90(), torch.bfloat16, 16, 8, head_dim)
    assert not rep.spills, rep
    assert rep.sass_counts["LDG.E.128"] > 0, rep


@needs_triton
def test_sm90_silu_and_mul_compiles_lean() -> None:
    rep = _compile_silu(_sm90(), torch.bfloat16, 3072)
    assert not rep.spills, rep
    assert rep.sass_counts["LDG.E.128"] > 0, rep


# --- Triton on the GPU ---------------------------------------------------------------------------

GPU_DTYPES = [torch.bfloat16, torch.float16]
GPU_ULPS = 3.0  # vs torch on the same inputs: fp32 rsqrt/exp/summation differences flip roundings


def _triton() -> Any:
    from rollout_accel.kernels import fused_ops_triton

    return fused_ops_triton


def _check_gpu(
    gen: torch.Generator,
    outs: tuple[torch.Tensor, ...],
    refs: tuple[torch.Tensor, ...],
    refs32: tuple[torch.Tensor, ...],
) -> None:
    for out, ref, ref32 in zip(outs, refs, refs32, strict=True):
        assert out.dtype == ref.dtype and out.shape == ref.shape and out.is_contiguous()
        assert torch.isfinite(out).all(), f"unwritten or NaN output, seed {gen.initial_seed()}"
        rel, ulps = _rel_err(out, ref32), _ulp_err(out, ref)
        assert rel <= 1e-2, f"rel_err {rel:.2e} vs fp32 reference, seed {gen.initial_seed()}"
        assert ulps <= GPU_ULPS, f"{ulps:.2f} ulps vs torch, seed {gen.initial_seed()}"


def _nan(t: torch.Tensor) -> torch.Tensor:
    return torch.full(t.shape, float("nan"), dtype=t.dtype, device=t.device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize(("tokens", "hidden"), [(1, 1024), (7, 1024), (256, 1024), (33, 4096)])
def test_gpu_rows_match_reference(
    gen: torch.Generator, dtype: torch.dtype, tokens: int, hidden: int
) -> None:
    ft = _triton()
    x = (3 * torch.randn(tokens, hidden, generator=gen)).to(dtype).cuda()
    res = torch.randn(tokens, hidden, generator=gen).to(dtype).cuda()
    w = _weight(gen, hidden, dtype, "cuda")
    out = ft.rms_norm(x, w, 1e-6, out=_nan(x))
    ref32 = fused_ops.rms_norm_reference(x.float(), w.float(), 1e-6)
    _check_gpu(gen, (out,), (fused_ops.rms_norm_reference(x, w, 1e-6),), (ref32,))
    out, new_res = ft.add_rms_norm(x, res, w, 1e-6, out=_nan(x), residual_out=_nan(x))
    ref, ref_res = fused_ops.add_rms_norm_reference(x, res, w, 1e-6)
    assert torch.equal(new_res, ref_res)
    ref32 = fused_ops.rms_norm_reference(ref_res.float(), w.float(), 1e-6)
    _check_gpu(gen, (out,), (ref,), (ref32,))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize(
    ("tokens", "hq", "hkv", "head_dim", "norm"),
    [
        (1, 16, 8, 128, True),
        (256, 16, 8, 128, True),
        (7, 16, 8, 64, True),
        (256, 32, 8, 128, False),
    ],
)
def test_gpu_qk_norm_rope_matches_reference(
    gen: torch.Generator,
    dtype: torch.dtype,
    tokens: int,
    hq: int,
    hkv: int,
    head_dim: int,
    norm: bool,
) -> None:
    qkv = (2 * torch.randn(tokens, (hq + 2 * hkv) * head_dim, generator=gen)).to(dtype).cuda()
    q = qkv[:, : hq * head_dim].view(tokens, hq, head_dim)
    k = qkv[:, hq * head_dim : (hq + hkv) * head_dim].view(tokens, hkv, head_dim)
    cos, sin = _rope_tables(gen, tokens, head_dim, "cuda")
    qw = _weight(gen, head_dim, dtype, "cuda") if norm else None
    kw = _weight(gen, head_dim, dtype, "cuda") if norm else None
    outs = _triton().qk_norm_rope(q, k, cos, sin, qw, kw, 1e-6, q_out=_nan(q), k_out=_nan(k))
    refs = fused_ops.qk_norm_rope_reference(q, k, cos, sin, qw, kw, 1e-6)
    refs32 = fused_ops.qk_norm_rope_reference(
        q.float(),
        k.float(),
        cos,
        sin,
        None if qw is None else qw.float(),
        None if kw is None else kw.float(),
        1e-6,
    )
    _check_gpu(gen, outs, refs, refs32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize(("tokens", "inter"), [(1, 3072), (256, 3072), (5, 1000)])
def test_gpu_silu_and_mul_matches_reference(
    gen: torch.Generator, dtype: torch.dtype, tokens: int, inter: int
) -> None:
    gate_up = (4 * torch.randn(tokens, 2 * inter, generator=gen)).to(dtype).cuda()
    gate, up = gate_up[:, :inter], gate_up[:, inter:]
    out = _triton().silu_and_mul(gate, up, out=_nan(gate.contiguous()))
    ref32 = fused_ops.silu_and_mul_reference(gate.float(), up.float())
    _check_gpu(gen, (out,), (fused_ops.silu_and_mul_reference(gate, up),), (ref32,))


@pytest.mark.gpu
def test_gpu_cuda_graph_replay(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """All four ops (through the dispatch) captured once, replayed on new inputs."""
    monkeypatch.delenv(fused_ops.ENV_VAR, raising=False)
    reload_overrides()
    t, h, hq, hkv, d, inter, dtype = 64, 1024, 16, 8, 128, 3072, torch.bfloat16
    x = torch.empty(t, h, dtype=dtype, device="cuda")
    res = torch.empty_like(x)
    qkv = torch.empty(t, (hq + 2 * hkv) * d, dtype=dtype, device="cuda")
    gate_up = torch.empty(t, 2 * inter, dtype=dtype, device="cuda")
    cos = torch.empty(t, d, device="cuda")
    sin = torch.empty_like(cos)
    w, qw, kw = (_weight(gen, n, dtype, "cuda") for n in (h, d, d))

    def step() -> tuple[torch.Tensor, ...]:
        q = qkv[:, : hq * d].view(t, hq, d)
        k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
        return (
            fused_ops.rms_norm(x, w, 1e-6),
            *fused_ops.add_rms_norm(x, res, w, 1e-6),
            *fused_ops.qk_norm_rope(q, k, cos, sin, qw, kw, 1e-6),
            fused_ops.silu_and_mul(gate_up[:, :inter], gate_up[:, inter:]),
        )

    def fill() -> None:
        for buf in (x, res, qkv, gate_up):
            buf.copy_(torch.randn(buf.shape, generator=gen).to(dtype))
        c, s = _rope_tables(gen, t, d, "cuda")
        cos.copy_(c)
        sin.copy_(s)

    fill()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for _ in range(3):
        fill()
        graph.replay()
        torch.cuda.synchronize()
        with monkeypatch.context() as m:
            m.setenv(fused_ops.ENV_VAR, "reference")
            reload_overrides()
            refs = step()
        reload_overrides()
        for out, ref in zip(outs, refs, strict=True):
            assert torch.isfinite(out).all()
            assert _ulp_err(out, ref) <= GPU_ULPS, f"seed {gen.initial_seed()}"
