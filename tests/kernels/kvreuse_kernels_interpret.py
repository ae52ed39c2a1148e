"""Runs the KV-reuse Triton kernels (re-rotation, selective attention) under Triton's CPU
interpreter against their references.

Usage, from the repository root: python -m tests.kernels.kvreuse_kernels_interpret [rerotate|selective]
Exits 1 if any case fails. TRITON_INTERPRET must be set before triton is imported, hence a
script of its own run in a fresh process by `test_kvreuse_kernels.py`. float32 and float16 only
(the interpreter's bfloat16 `tl.dot` and casts are not the GPU's).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import sys

import torch

from rollout_accel.kernels import rerotate, selective_attention
from rollout_accel.kernels import rerotate_triton as rt
from rollout_accel.kernels import selective_attention_triton as st

FAILURES: list[str] = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def check_rerotate(gen: torch.Generator) -> None:
    for dtype, tol in ((torch.float32, 1e-6), (torch.float16, 2e-3)):
        for heads, dim in ((2, 32), (3, 64), (8, 128)):
            slots, n = 64, 20
            cache = torch.randn(slots, heads, dim, generator=gen).to(dtype)
            inv_freq = 1.0 / 1e6 ** (torch.arange(0, dim, 2).float() / dim)
            perm = torch.randperm(slots, generator=gen)
            src, dst = perm[:n], perm[n : 2 * n]
            old = torch.randint(0, 5000, (n,), generator=gen)
            new = torch.randint(0, 5000, (n,), generator=gen)
            ref = cache.clone()
            rerotate.rerotate_keys_reference(ref, src, dst, old, new, inv_freq)
            out = cache.clone()
            rt.rerotate_keys(out, src, dst, old, new, inv_freq)
            err = rel_err(out, ref)
            untouched = torch.equal(out[perm[2 * n :]], cache[perm[2 * n :]])
            report(
                f"rerotate {dtype} h{heads} d{dim}", err <= tol and untouched, f"rel_err {err:.2e}"
            )
            inplace = cache.clone()
            rt.rerotate_keys(inplace, src, src, old, new, inv_freq)
            ref2 = cache.clone()
            rerotate.rerotate_keys_reference(ref2, src, src, old, new, inv_freq)
            err = rel_err(inplace, ref2)
            report(f"rerotate in place {dtype} h{heads} d{dim}", err <= tol, f"rel_err {err:.2e}")


def check_selective(gen: torch.Generator) -> None:
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 1e-2)):
        for hq, hkv, dim, page in ((4, 2, 32, 1), (4, 4, 64, 4), (8, 2, 128, 1)):
            seq_lens = [70, 5, 130]
            slots_needed = sum(-(-s // page) * page for s in seq_lens) + page
            num_pages = slots_needed // page + 1
            k = torch.randn(num_pages * page, hkv, dim, generator=gen).to(dtype)
            v = torch.randn(num_pages * page, hkv, dim, generator=gen).to(dtype)
            max_pages = max(-(-s // page) for s in seq_lens)
            table = torch.zeros(len(seq_lens), max_pages, dtype=torch.int32)
            pages = torch.randperm(num_pages - 1, generator=gen) + 1
            cursor = 0
            positions, cu = [], [0]
            for b, s in enumerate(seq_lens):
                np_ = -(-s // page)
                table[b, :np_] = pages[cursor : cursor + np_].int()
                cursor += np_
                count = max(1, int(s * 0.4))
                pos = torch.randperm(s, generator=gen)[:count].sort().values
                if b == 0:
                    pos[-1] = s - 1
                positions.append(pos)
                cu.append(cu[-1] + count)
            q_pos = torch.cat(positions).int()
            q = torch.randn(cu[-1], hq, dim, generator=gen).to(dtype)
            cu_t = torch.tensor(cu, dtype=torch.int32)
            lens_t = torch.tensor(seq_lens, dtype=torch.int32)
            ref = selective_attention.selective_attention_reference(
                q.float(), k.float(), v.float(), table, cu_t, lens_t, q_pos, page, dim**-0.5
            )
            out = st.selective_attention(q, k, v, table, cu_t, lens_t, q_pos, page, dim**-0.5)
            err = rel_err(out, ref)
            report(
                f"selective {dtype} hq{hq} hkv{hkv} d{dim} page{page}",
                err <= tol,
                f"rel_err {err:.2e}",
            )


def main(argv: list[str]) -> int:
    which = argv[0] if argv else "all"
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    print(f"seed {gen.initial_seed()}")
    if which in ("all", "rerotate"):
        check_rerotate(gen)
    if which in ("all", "selective"):
        check_selective(gen)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
