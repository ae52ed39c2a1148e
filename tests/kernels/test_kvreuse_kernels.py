"""KV-reuse kernels: key re-rotation and selective (positions) attention — references against
first principles, the Triton kernels under the CPU interpreter, and on a GPU (`gpu` marker)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from rollout_accel.kernels import rerotate, selective_attention
from rollout_accel.kernels.backend import reload_overrides
from rollout_accel.kernels.paged_attention_reference import paged_prefill_attention_reference
from tests.kernels.interpreter import run_interpreter

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def _case(gen, seq_lens, hq=4, hkv=2, dim=32, dtype=torch.float32, device="cpu"):
    total = sum(seq_lens)
    k = torch.randn(total + 1, hkv, dim, generator=gen).to(dtype).to(device)
    v = torch.randn(total + 1, hkv, dim, generator=gen).to(dtype).to(device)
    perm = (torch.randperm(total, generator=gen) + 1).int()
    table = torch.zeros(len(seq_lens), max(seq_lens), dtype=torch.int32)
    at = 0
    for b, s in enumerate(seq_lens):
        table[b, :s] = perm[at : at + s]
        at += s
    return k, v, table.to(device)


def test_selective_reference_is_prefill_for_trailing_positions() -> None:
    gen = torch.Generator().manual_seed(0)
    seq_lens, q_lens = [37, 20], [9, 20]
    k, v, table = _case(gen, seq_lens)
    q = torch.randn(sum(q_lens), 4, 32, generator=gen)
    cu = torch.tensor([0, 9, 29], dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    pos = torch.cat([torch.arange(28, 37), torch.arange(0, 20)])
    ref = paged_prefill_attention_reference(q, k, v, table, cu, lens, 1, 0.2)
    out = selective_attention.selective_attention_reference(q, k, v, table, cu, lens, pos, 1, 0.2)
    assert torch.equal(out, ref)


def test_selective_reference_against_dense_softmax() -> None:
    gen = torch.Generator().manual_seed(1)
    k, v, table = _case(gen, [50], hq=2, hkv=1, dim=16)
    pos = torch.tensor([0, 3, 17, 18, 49])
    q = torch.randn(5, 2, 16, generator=gen)
    out = selective_attention.selective_attention_reference(
        q, k, v, table, torch.tensor([0, 5]), torch.tensor([50]), pos, 1, 0.25
    )
    keys, values = k[table[0].long()][:, 0], v[table[0].long()][:, 0]
    for i, p in enumerate(pos.tolist()):
        for h in range(2):
            w = torch.softmax(q[i, h] @ keys[: p + 1].T * 0.25, dim=0)
            torch.testing.assert_close(out[i, h], w @ values[: p + 1])


def test_rerotation_round_trip_and_in_place() -> None:
    gen = torch.Generator().manual_seed(2)
    inv_freq = 1.0 / 1e4 ** (torch.arange(0, 32, 2).float() / 32)
    cache = torch.randn(20, 2, 32, generator=gen)
    orig = cache.clone()
    src = torch.arange(1, 11)
    old, new = (
        torch.randint(0, 3000, (10,), generator=gen),
        torch.randint(0, 3000, (10,), generator=gen),
    )
    rerotate.rerotate_keys(cache, src, src, old, new, inv_freq)
    assert not torch.allclose(cache[src], orig[src])
    assert torch.equal(cache[11:], orig[11:])
    rerotate.rerotate_keys(cache, src, src, new, old, inv_freq)
    torch.testing.assert_close(cache, orig, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="inv_freq"):
        rerotate.rerotate_keys(cache, src, src, old, new, inv_freq[:-1])


@pytest.mark.parametrize("module", [rerotate, selective_attention])
def test_dispatch_defaults_and_env(module, monkeypatch) -> None:
    backend = (
        rerotate.rerotate_backend if module is rerotate else selective_attention.selective_backend
    )
    monkeypatch.delenv(module.ENV_VAR, raising=False)
    reload_overrides()
    assert backend(torch.device("cpu")) == "reference"
    monkeypatch.setenv(module.ENV_VAR, "reference")
    reload_overrides()
    assert backend(torch.device("cuda")) == "reference"
    monkeypatch.setenv(module.ENV_VAR, "cutlass")
    reload_overrides()
    with pytest.raises(ValueError, match="cutlass"):
        backend(torch.device("cpu"))
    monkeypatch.delenv(module.ENV_VAR)
    reload_overrides()


@needs_triton
@pytest.mark.parametrize("which", ["rerotate", "selective"])
def test_triton_kernels_under_interpreter(which: str) -> None:
    proc = run_interpreter(
        "tests.kernels.kvreuse_kernels_interpret", which, drop_env="ROLLOUT_ACCEL_REROTATE"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok  " in proc.stdout and "FAIL" not in proc.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_kernels_on_gpu(dtype: torch.dtype) -> None:
    from rollout_accel.kernels import rerotate_triton, selective_attention_triton

    gen = torch.Generator().manual_seed(3)
    dev = "cuda"
    # re-rotation, 8 kv heads x 128 (qwen3-0.6b)
    cache = torch.randn(4096, 8, 128, generator=gen).to(dtype).to(dev)
    inv_freq = (1.0 / 1e6 ** (torch.arange(0, 128, 2).float() / 128)).to(dev)
    perm = torch.randperm(4096, generator=gen).to(dev)
    src, dst = perm[:1500], perm[1500:3000]
    old = torch.randint(0, 40000, (1500,), generator=gen).to(dev)
    new = torch.randint(0, 40000, (1500,), generator=gen).to(dev)
    ref = cache.clone()
    rerotate.rerotate_keys_reference(ref, src, dst, old, new, inv_freq)
    out = cache.clone()
    rerotate_triton.rerotate_keys(out, src, dst, old, new, inv_freq)
    err = float((out.double() - ref.double()).norm() / ref.double().norm())
    assert err <= (2e-6 if dtype == torch.float32 else 4e-3), err
    # selective attention: 2 sequences, 15% + a tail of queries
    seq_lens = [3000, 1200]
    k, v, table = _case(gen, seq_lens, hq=16, hkv=8, dim=128, dtype=dtype, device=dev)
    pos, cu = [], [0]
    for s in seq_lens:
        p = torch.cat(
            [torch.randperm(s - 64, generator=gen)[: s // 7].sort().values, torch.arange(s - 64, s)]
        )
        pos.append(p)
        cu.append(cu[-1] + p.numel())
    q_pos = torch.cat(pos).to(dev)
    q = torch.randn(cu[-1], 16, 128, generator=gen).to(dtype).to(dev)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=dev)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
    ref = selective_attention.selective_attention_reference(
        q.float(), k.float(), v.float(), table, cu_t, lens, q_pos, 1, 128**-0.5
    )
    got = selective_attention_triton.selective_attention(
        q, k, v, table, cu_t, lens, q_pos, 1, 128**-0.5
    )
    err = float((got.double() - ref.double()).norm() / ref.double().norm())
    assert err <= (1e-5 if dtype == torch.float32 else 1e-2), err
