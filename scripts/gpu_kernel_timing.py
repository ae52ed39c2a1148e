"""Times the fused Triton kernels and the sampler against their PyTorch references at decode
size (Qwen3-0.6B shape, 256 rows), eager and replayed from a CUDA graph. A benchmark, not a test:
the correctness checks live in tests/kernels. Prints a table; JSON to $OUT/kernel_timing.json.

python scripts/gpu_kernel_timing.py
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from repo_path import expose_repo


def main() -> None:
    expose_repo()
    import torch
    from triton.testing import do_bench

    from rollout_accel.kernels import fused_ops, fused_ops_triton, sampling, sampling_triton

    def timed(fn: Callable[[], Any]) -> tuple[float, float]:
        eager = do_bench(fn, return_mode="median") * 1e3
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(10):
                fn()
        return eager, do_bench(graph.replay, return_mode="median") * 1e3 / 10

    gen = torch.Generator().manual_seed(0)
    t, h, hq, hkv, d, inter, vocab, dt = 256, 1024, 16, 8, 128, 3072, 151936, torch.bfloat16

    def rand(*shape: int, dtype: torch.dtype = dt) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype).cuda()

    x, res, w, qw, kw = rand(t, h), rand(t, h), rand(h), rand(d), rand(d)
    qkv = rand(t, (hq + 2 * hkv) * d)
    q, k = qkv[:, : hq * d].view(t, hq, d), qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    angles = torch.rand(t, d // 2, generator=gen).cuda() * 6.28
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dt), torch.cat([angles.sin()] * 2, -1).to(dt)
    gate_up = rand(t, 2 * inter)
    gate, up = gate_up[:, :inter], gate_up[:, inter:]
    logits = rand(t, vocab, dtype=torch.float32) * 3
    temps = torch.ones(t, device="cuda")
    seeds = torch.randint(0, 2**62, (t,), generator=gen).cuda()
    steps = torch.randint(0, 4096, (t,), generator=gen).cuda()
    off = torch.zeros(t, device="cuda")
    no_k = torch.full((t,), -1, device="cuda", dtype=torch.int64)
    ft, ref = fused_ops_triton, fused_ops
    ops = {
        "rms_norm": (lambda: ft.rms_norm(x, w, 1e-6), lambda: ref.rms_norm_reference(x, w, 1e-6)),
        "add_rms_norm": (
            lambda: ft.add_rms_norm(x, res, w, 1e-6),
            lambda: ref.add_rms_norm_reference(x, res, w, 1e-6),
        ),
        "qk_norm_rope": (
            lambda: ft.qk_norm_rope(q, k, cos, sin, qw, kw, 1e-6),
            lambda: ref.qk_norm_rope_reference(q, k, cos, sin, qw, kw, 1e-6),
        ),
        "silu_and_mul": (
            lambda: ft.silu_and_mul(gate, up),
            lambda: ref.silu_and_mul_reference(gate, up),
        ),
        "sample (V=151936)": (
            lambda: sampling_triton.sample(logits, temps, seeds, steps),
            lambda: sampling.sample_tokens(
                logits, temps, no_k, off + 1, off, seeds, steps, need_filter=False
            ),
        ),
    }
    rows = []
    for name, (fast, slow) in ops.items():
        fe, fg = timed(fast)
        re_, rg = timed(slow)
        rows.append(
            {
                "op": name,
                "triton_eager_us": fe,
                "ref_eager_us": re_,
                "triton_graph_us": fg,
                "ref_graph_us": rg,
            }
        )
    print(f"\n{torch.cuda.get_device_name()} bf16, {t} rows (decode size, Qwen3-0.6B shape)")
    print(
        f"{'op':20s}{'triton eager':>14s}{'ref eager':>11s}{'triton graph':>14s}{'ref graph':>11s}"
    )
    for r in rows:
        print(
            f"{r['op']:20s}{r['triton_eager_us']:12.1f}us{r['ref_eager_us']:9.1f}us"
            f"{r['triton_graph_us']:12.1f}us{r['ref_graph_us']:9.1f}us"
        )
    out = os.environ.get("OUT")
    if out:
        Path(out, "kernel_timing.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
