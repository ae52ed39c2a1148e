"""The Triton kernels compiled for Hopper (sm_90) on the CPU: no spills, the intended instructions.

Catches a config or kernel change that would spill registers, drop wgmma in prefill, or narrow
the K/V loads, without device time. Skipped where Triton's bundled ptxas/cuobjdump are missing.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

sm90 = pytest.importorskip("tests.kernels.sm90_compile", reason="needs triton's compiler API")

pytestmark = pytest.mark.skipif(not sm90.tools_available(), reason="no bundled ptxas/cuobjdump")


@pytest.mark.parametrize("direct", [True, False])
def test_decode_bf16_d128_compiles_lean(direct: bool) -> None:
    rep = sm90.compile_decode(torch.bfloat16, 128, 2, 1, direct)
    assert not rep.spills, rep
    assert rep.sass_counts["HMMA"] > 0, rep  # tensor-core products even at 2 heads per group
    assert rep.sass_counts["LDGSTS.E.BYPASS.128"] > 0, rep  # 16-byte async K/V copies
    assert rep.shared_bytes <= 64 * 1024, rep  # several programs per SM


def test_prefill_bf16_d128_uses_wgmma() -> None:
    rep = sm90.compile_prefill(torch.bfloat16, 128, 2, 1)
    assert not rep.spills, rep
    assert rep.sass_counts["HGMMA"] > 0, rep
    assert rep.sass_counts["LDGSTS.E.BYPASS.128"] > 0, rep
