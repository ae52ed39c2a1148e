"""Fused elementwise ops of a decoder layer: RMSNorm, residual add + RMSNorm, Qwen3's per-head q/k
RMSNorm + rotary embedding, and SiLU-and-mul.

Each op has a plain-PyTorch reference here that is literally Hugging Face's formula (it is the CPU
path and the oracle) and a single-launch Triton kernel in `fused_ops_triton`, used on CUDA
tensors. `ROLLOUT_ACCEL_FUSED=reference|triton` forces a backend (read on every call, so tests and
ablations can flip it).

Invariants:
  * Both backends round where Hugging Face rounds: float32 statistics, results cast back to the
    input dtype before the weight product; the Triton kernels differ from the reference only by
    float32 summation order and rsqrt/exp approximations (about one ulp of the output dtype).
  * Inference only (no autograd); both paths are CUDA-graph capturable: no host syncs, no
    data-dependent shapes (outputs are fresh tensors sized from input shapes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import Backend, choose_backend

try:
    from . import fused_ops_triton as _triton_impl
except ImportError:  # no triton on this machine: the reference serves every call
    _triton_impl = None

ENV_VAR = "ROLLOUT_ACCEL_FUSED"


def triton_available() -> bool:
    """Whether the Triton kernels imported."""
    return _triton_impl is not None


def fused_backend(device: torch.device) -> Backend:
    """Backend used for tensors on `device`: the env override, else Triton on CUDA if present."""
    return choose_backend(ENV_VAR, device, _triton_impl is not None)


# --- references (Hugging Face's formulas, verbatim) ----------------------------------------------


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm/Qwen3RMSNorm: float32 statistics, cast back, then the weight product."""
    input_dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(input_dtype)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the residual sum in the inputs' dtype."""
    new_residual = x + residual
    return rms_norm_reference(new_residual, weight, eps), new_residual


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    c, s = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    return x * c + _rotate_half(x) * s


def qk_norm_rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF Qwen3 attention prologue: optional per-head RMSNorm over D, then rotary (rotate_half).

    q [T, Hq, D], k [T, Hkv, D], cos/sin [T, D] (HF layout, cat(freqs, freqs)); returns new
    contiguous tensors.
    """
    if q_weight is not None:
        q = rms_norm_reference(q, q_weight, eps)
    if k_weight is not None:
        k = rms_norm_reference(k, k_weight, eps)
    return _rope_reference(q, cos, sin).contiguous(), _rope_reference(k, cos, sin).contiguous()


def silu_and_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF MLP activation: act_fn(gate_proj(x)) * up_proj(x) with act_fn = SiLU."""
    return F.silu(gate) * up


# --- dispatch ------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: x [..., H] (bf16/fp16/fp32), weight [H] -> x's shape.

    The result dtype is torch's promotion of (x, weight), i.e. x's dtype when the weight has it.
    """
    if fused_backend(x.device) == "triton" and x.shape[-1] <= _max_hidden():
        assert _triton_impl is not None
        return _triton_impl.rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new_residual) with new_residual = x + residual (same dtype), normed = its RMSNorm.

    One kernel on the Triton path; the inputs are not modified.
    """
    if fused_backend(x.device) == "triton" and x.shape[-1] <= _max_hidden():
        assert _triton_impl is not None
        return _triton_impl.add_rms_norm(x, residual, weight, eps)
    return add_rms_norm_reference(x, residual, weight, eps)


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_out, k_out): optional per-head RMSNorm (Qwen3 q_norm/k_norm), then HF rotary.

    q [T, Hq, D] and k [T, Hkv, D] may be strided views of a fused projection (contiguous in D);
    cos/sin [T, D]; the weights [D] in q's dtype. Outputs are new contiguous tensors in q's dtype.
    One launch for q and k together on the Triton path.
    """
    if fused_backend(q.device) == "triton":
        assert _triton_impl is not None
        return _triton_impl.qk_norm_rope(q, k, cos, sin, q_weight, k_weight, eps)
    return qk_norm_rope_reference(q, k, cos, sin, q_weight, k_weight, eps)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate/up [T, I] of one dtype (may be row-strided views of gate_up)."""
    if fused_backend(gate.device) == "triton":
        assert _triton_impl is not None
        return _triton_impl.silu_and_mul(gate, up)
    return silu_and_mul_reference(gate, up)


def _max_hidden() -> int:
    assert _triton_impl is not None
    return _triton_impl.MAX_HIDDEN
