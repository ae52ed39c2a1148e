"""Compile the attention kernels for Hopper (sm_90) on a machine without a GPU, and read the result.

Triton ships ptxas and cuobjdump, so the whole pipeline down to SASS runs on the CPU. What comes
back answers most performance questions before any device time: registers, spills (stack bytes,
LDL/STL), shared memory, whether products run on wgmma (HGMMA) or mma.sync (HMMA), and whether
global loads are 16 bytes wide. Arguments are specialised as Triton does at launch: 16-byte
aligned pointers, integers divisible by 16 marked so.

Usage, from the repository root: python -m tests.kernels.sm90_compile   (a line per default config)
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from rollout_accel.kernels import paged_attention_triton as pat

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_PTR = {
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.float32: "*fp32",
    torch.int32: "*i32",
}
SASS_OPS = ("HGMMA", "HMMA", "LDGSTS.E.BYPASS.128", "LDG.E.128", "LDL", "STL")


@dataclass(frozen=True)
class Sm90Report:
    """Resources and instruction counts of one compiled kernel."""

    registers: int
    stack_bytes: int
    shared_bytes: int
    sass_counts: dict[str, int]

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.sass_counts["LDL"] > 0 or self.sass_counts["STL"] > 0


def tools_available() -> bool:
    return all(os.path.exists(os.path.join(_BIN, tool)) for tool in ("ptxas", "cuobjdump"))


def compile_sm90(
    fn: Any, args: dict[str, Any], constexprs: dict[str, Any], num_warps: int, num_stages: int
) -> Sm90Report:
    """Compile `fn` for sm_90; `args` maps each runtime argument to a dtype (pointer) or a value."""
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, torch.dtype):
            signature[name] = _PTR[value]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(
        ASTSource(fn, signature, constexprs, attrs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = _run(os.path.join(_BIN, "cuobjdump"), "-res-usage", path)
        sass = _run(os.path.join(_BIN, "cuobjdump"), "-sass", path)
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage)
    if match is None:
        raise RuntimeError(f"unexpected cuobjdump output: {usage[:500]}")
    counts = {op: len(re.findall(rf"\b{re.escape(op)}\b", sass)) for op in SASS_OPS}
    return Sm90Report(int(match[1]), int(match[2]), int(kernel.metadata.shared), counts)


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def compile_decode(
    dtype: torch.dtype, head_dim: int, group: int, page_size: int, direct: bool
) -> Sm90Report:
    """The decode split kernel at its default config, 8 kv heads, splits 3 (or direct output)."""
    cfg = pat.default_decode_config(head_dim, dtype)
    hq, splits = 8 * group, 3
    mid, lse = (dtype, dtype) if direct else (torch.float32, torch.float32)
    args = {
        "q_ptr": dtype,
        "k_ptr": dtype,
        "v_ptr": dtype,
        "block_table_ptr": torch.int32,
        "seq_lens_ptr": torch.int32,
        "out_ptr": dtype,
        "mid_o_ptr": mid,
        "mid_lse_ptr": lse,
        "qk_scale": 0.1,
        "num_splits": splits,
        "stride_qb": hq * head_dim,
        "stride_qh": head_dim,
        "stride_kt": 8 * head_dim,
        "stride_kh": head_dim,
        "stride_vt": 8 * head_dim,
        "stride_vh": head_dim,
        "stride_bt": 1024,
        "stride_ob": hq * head_dim,
        "stride_oh": head_dim,
        "stride_mb": hq * splits * head_dim,
        "stride_mh": splits * head_dim,
        "stride_ms": head_dim,
        "stride_lb": hq * splits,
        "stride_lh": splits,
    }
    constexprs = {
        "GROUP": group,
        "BLOCK_H": max(16, triton.next_power_of_2(group)),
        "HEAD_DIM": head_dim,
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
        "BLOCK_N": cfg.block_n,
        "PAGE_SIZE": page_size,
        "DIRECT": direct,
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }
    return compile_sm90(pat._decode_split_kernel, args, constexprs, cfg.num_warps, cfg.num_stages)


def compile_prefill(dtype: torch.dtype, head_dim: int, group: int, page_size: int) -> Sm90Report:
    """The prefill kernel at its default config, 8 kv heads."""
    cfg = pat.default_prefill_config(head_dim, dtype)
    hq = 8 * group
    args = {
        "q_ptr": dtype,
        "k_ptr": dtype,
        "v_ptr": dtype,
        "out_ptr": dtype,
        "block_table_ptr": torch.int32,
        "cu_q_lens_ptr": torch.int32,
        "seq_lens_ptr": torch.int32,
        "qk_scale": 0.1,
        "stride_qt": hq * head_dim,
        "stride_qh": head_dim,
        "stride_kt": 8 * head_dim,
        "stride_kh": head_dim,
        "stride_vt": 8 * head_dim,
        "stride_vh": head_dim,
        "stride_ot": hq * head_dim,
        "stride_oh": head_dim,
        "stride_bt": 1024,
    }
    constexprs = {
        "GROUP": group,
        "HEAD_DIM": head_dim,
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "PAGE_SIZE": page_size,
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }
    return compile_sm90(pat._prefill_kernel, args, constexprs, cfg.num_warps, cfg.num_stages)


if __name__ == "__main__":
    for dtype in (torch.bfloat16, torch.float32):
        for head_dim in (64, 128):
            for page_size in (1, 16):
                for direct in (True, False):
                    rep = compile_decode(dtype, head_dim, 2, page_size, direct)
                    print(f"decode  {dtype} d={head_dim} page={page_size} direct={direct}: {rep}")
                print(
                    f"prefill {dtype} d={head_dim} page={page_size}: "
                    f"{compile_prefill(dtype, head_dim, 2, page_size)}"
                )
