"""The KV-reuse Triton kernels compiled for Hopper (sm_90) on the CPU: they compile for the real
target (the interpreter does not lower anything), without spills, the attention on tensor cores."""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

sm90 = pytest.importorskip("tests.kernels.sm90_compile", reason="needs triton's compiler API")

pytestmark = pytest.mark.skipif(not sm90.tools_available(), reason="no bundled ptxas/cuobjdump")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_selective_attention_compiles_lean(dtype: torch.dtype) -> None:
    import triton

    from rollout_accel.kernels import selective_attention_triton as st

    hq, hkv, d = 16, 8, 128
    block_m, block_n, warps, stages = st._config(d, dtype)
    args = {
        "q_ptr": dtype,
        "k_ptr": dtype,
        "v_ptr": dtype,
        "out_ptr": dtype,
        "block_table_ptr": torch.int32,
        "cu_q_lens_ptr": torch.int32,
        "q_pos_ptr": torch.int32,
        "qk_scale": 0.1,
        "stride_qt": hq * d,
        "stride_qh": d,
        "stride_kt": hkv * d,
        "stride_kh": d,
        "stride_vt": hkv * d,
        "stride_vh": d,
        "stride_ot": hq * d,
        "stride_oh": d,
        "stride_bt": 1024,
    }
    constexprs = {
        "GROUP": hq // hkv,
        "HEAD_DIM": d,
        "BLOCK_D": triton.next_power_of_2(d),
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "PAGE_SIZE": 1,
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }
    rep = sm90.compile_sm90(st._selective_kernel, args, constexprs, warps, stages)
    assert not rep.spills, rep
    if dtype == torch.bfloat16:
        assert rep.sass_counts["HGMMA"] + rep.sass_counts["HMMA"] > 0, rep


def test_rerotate_compiles_lean() -> None:
    from rollout_accel.kernels import rerotate_triton as rt

    args = {
        "k_ptr": torch.bfloat16,
        "src_ptr": torch.int32,
        "dst_ptr": torch.int32,
        "old_ptr": torch.int32,
        "new_ptr": torch.int32,
        "freq_ptr": torch.float32,
        "stride_t": 8 * 128,
        "stride_h": 128,
    }
    constexprs = {"NUM_HEADS": 8, "HALF": 64, "BLOCK_H": 8, "BLOCK_HALF": 64}
    rep = sm90.compile_sm90(rt._rerotate_kernel, args, constexprs, 4, 1)
    assert not rep.spills, rep
