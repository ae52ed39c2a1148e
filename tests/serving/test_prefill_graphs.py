"""Prefill-chunk graphs (serving/engine/prefill_graphs.py) and the runner's two-replay steps, on
the CPU: the padded static layout against the eager forward, the bucket sizes, and whole engines
with graph capture/replay emulated (cuda_graphs.EMULATE_ENV: replay runs the captured body over
the same static inputs) against the eager engine — greedy and seeded sampling, chunked and
cached prompts, prompt logprobs (which stay eager), and release/resume (graphs dropped and
captured again). On a GPU, test_engine_gpu.py compares real graphs with the eager path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rollout_accel.serving.engine import Engine
from rollout_accel.serving.engine.cuda_graphs import EMULATE_ENV
from rollout_accel.serving.engine.model_runner import ModelRunner
from rollout_accel.serving.engine.prefill_graphs import PrefillGraphs, token_buckets


def _prompts(seed: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lens = [40, 3, 70, 25, 9, 55, 31, 17, 90, 2]
    prompts = [torch.randint(0, 500, (n,), generator=gen).tolist() for n in lens]
    return prompts + [prompts[0] + [7, 8, 9], prompts[2][:50]]  # cached prefixes too


def test_token_buckets_cover_every_chunk_with_bounded_padding() -> None:
    buckets = token_buckets(4096)
    assert buckets[0] == 64 and buckets[-1] == 4096
    assert buckets == sorted(set(buckets))
    for n in range(1, 4097):
        bucket = next(b for b in buckets if b >= n)
        # Padding: under a quarter of the chunk above 512 tokens; below, less than the chunk
        # (small chunks are launch-bound: a graph of twice the size still wins).
        assert bucket - n <= (n // 4 if n > 512 else max(63, n - 1)), n
    assert token_buckets(100)[-1] == 128 and token_buckets(1) == [64]


def test_prefill_graph_layout_matches_the_eager_forward() -> None:
    """The padded static layout a prefill graph computes (padding tokens on the spare row and
    slot 0, padding items with no tokens, full-width block table, fixed logit rows), run eagerly
    on the CPU, gives the eager forward's logits and the same sampling rows for every prefill
    chunk the scheduler makes (chunks with a cached prefix included)."""
    checks: list[float] = []
    with Engine("tiny-qwen3", device="cpu", dtype="float32", max_prefill_tokens=24) as eng:
        runner = eng.runner
        graphs = PrefillGraphs(runner.model, runner.kv_cache, runner.table, 24)
        assert graphs.buckets == [64]
        original = runner.launch

        def checked(batch):
            _, prefill = ModelRunner._parts(batch)
            emitting = [i for i, it in enumerate(prefill.items) if it.emits_token]
            if emitting and graphs.fits(prefill):
                with torch.inference_mode():
                    runner.table.flush()
                    staged = graphs.stage(prefill)
                    got = graphs.forward_eager(staged.bucket)[: len(emitting)]
                    want, rows, nxt, _ = runner._forward_eager(prefill, emitting)
                assert staged.emitting == emitting
                assert staged.emit_rows.tolist() == rows.tolist()
                assert staged.emit_next.tolist() == nxt.tolist()
                checks.extend(float(d) for d in (got.float() - want.float()).abs().amax(dim=1))
            return original(batch)

        runner.launch = checked
        prompts = _prompts()
        eng.generate(
            input_ids=prompts,
            sampling_params={"temperature": 0, "max_new_tokens": 4, "ignore_eos": True},
        )
    assert len(checks) == len(prompts)  # every prompt's last chunk was checked
    assert max(checks) < 1e-4, checks


ENGINE = {"device": "cpu", "dtype": "float32", "max_prefill_tokens": 48, "cuda_graph_max_bs": 8}
GREEDY = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
SAMPLED = {"temperature": 1.0, "sampling_seed": 5, "max_new_tokens": 10, "ignore_eos": True}


def _generate(eng: Engine, params: dict, **kwargs) -> list[dict]:
    eng.flush_cache()
    return eng.generate(input_ids=_prompts(), sampling_params=params, return_logprob=True, **kwargs)


def _same(a: list[dict], b: list[dict]) -> None:
    assert [x["output_ids"] for x in a] == [x["output_ids"] for x in b]
    for x, y in zip(a, b, strict=True):
        lx = np.array([t[0] for t in x["meta_info"]["output_token_logprobs"]])
        ly = np.array([t[0] for t in y["meta_info"]["output_token_logprobs"]])
        assert np.allclose(lx, ly, atol=1e-4)


def test_emulated_graph_steps_equal_the_eager_engine(monkeypatch) -> None:
    """Prefill-only and mixed steps as graph replays (emulated) give the eager engine's tokens
    and logprobs, greedy and seeded; both kinds of step really ran through the graphs."""
    monkeypatch.delenv(EMULATE_ENV, raising=False)  # the reference: no graphs at all
    with Engine("tiny-qwen3", **ENGINE) as eager:
        assert eager.runner.chunk_graphs is None  # no CUDA, no emulation: no graphs at all
        want = {name: _generate(eager, p) for name, p in (("greedy", GREEDY), ("t1", SAMPLED))}
    monkeypatch.setenv(EMULATE_ENV, "1")
    with Engine("tiny-qwen3", **ENGINE) as eng:
        runner = eng.runner
        assert runner.graphs is not None and runner.chunk_graphs is not None
        launched: list[tuple[int, int]] = []
        original = runner._launch_graphed_parts

        def counted(batch, *parts):
            launched.append((batch.num_decode, len(batch.items) - batch.num_decode))
            return original(batch, *parts)

        runner._launch_graphed_parts = counted
        for name, params in (("greedy", GREEDY), ("t1", SAMPLED)):
            _same(_generate(eng, params), want[name])
        assert any(nd == 0 for nd, _ in launched), launched  # prefill-only steps
        assert any(nd > 0 and np_ > 0 for nd, np_ in launched), launched  # mixed steps
        assert runner.chunk_graphs.replays >= len(launched) > 0
        # Chunk graphs off: mixed steps are one eager forward again, same outputs.
        eng.loop.call(lambda: setattr(runner, "use_chunk_graphs", False))
        before = runner.graphed_prefill_steps
        _same(_generate(eng, GREEDY), want["greedy"])
        assert runner.graphed_prefill_steps == before


def test_emulated_graphs_leave_prompt_logprobs_eager_and_survive_release(monkeypatch) -> None:
    monkeypatch.setenv(EMULATE_ENV, "1")
    with Engine("tiny-qwen3", **ENGINE) as eng, Engine("tiny-qwen3", **{**ENGINE}) as other:
        runner = eng.runner
        # Prompt logprobs need every position's logits: those chunks run eagerly, and match.
        before = runner.graphed_prefill_steps
        with_input = _generate(eng, GREEDY, logprob_start_len=0)
        assert runner.graphed_prefill_steps == before
        eng.loop.call(lambda: setattr(runner, "use_chunk_graphs", False))
        reference = _generate(eng, GREEDY, logprob_start_len=0)
        eng.loop.call(lambda: setattr(runner, "use_chunk_graphs", True))
        for x, y in zip(with_input, reference, strict=True):
            a = [t[0] for t in x["meta_info"]["input_token_logprobs"][1:]]
            b = [t[0] for t in y["meta_info"]["input_token_logprobs"][1:]]
            assert np.allclose(a, b, atol=1e-4)
        # Release drops the graphs; resume captures them again; outputs unchanged.
        want = _generate(other, GREEDY)
        captures = runner.chunk_graphs.captures
        assert eng.release_memory_occupation()[0]
        assert not runner.chunk_graphs.captured
        assert eng.resume_memory_occupation()[0]
        assert runner.chunk_graphs.captured and runner.chunk_graphs.captures == captures + 1
        _same(_generate(eng, GREEDY), want)


def test_prefill_graph_cap_is_validated_and_wired() -> None:
    from rollout_accel.serving.engine.config import EngineConfig

    cfg = EngineConfig.from_kwargs(max_prefill_tokens=2048)
    assert cfg.prefill_graph_tokens() == 2048
    big = EngineConfig.from_kwargs(max_prefill_tokens=16384)
    assert big.prefill_graph_tokens() == 4096  # the default cap
    assert (
        EngineConfig.from_kwargs(
            max_prefill_tokens=16384, prefill_cuda_graph_max_tokens=8192
        ).prefill_graph_tokens()
        == 8192
    )
    assert EngineConfig.from_kwargs(prefill_cuda_graph_max_tokens=512).prefill_graph_tokens() == 512
    assert EngineConfig.from_kwargs(prefill_cuda_graph_max_tokens=0).prefill_graph_tokens() == 0
    sm = EngineConfig.from_kwargs(prefill_cuda_graph_max_tokens=0, sm_share=True)
    assert sm.prefill_graph_tokens() == sm.max_prefill_tokens  # SM sharing needs them
    for bad in (-1, 1.5, True, "64"):
        with pytest.raises(ValueError, match="prefill_cuda_graph_max_tokens"):
            EngineConfig.from_kwargs(prefill_cuda_graph_max_tokens=bad)


def test_server_flag_sets_the_cap() -> None:
    import argparse

    from rollout_accel.serving.server.server_args import add_server_args, parse_server_args

    parser = argparse.ArgumentParser()
    add_server_args(parser)
    kwargs, _ = parse_server_args(parser.parse_args(["--prefill-cuda-graph-max-tokens", "0"]), {})
    assert kwargs["prefill_cuda_graph_max_tokens"] == 0
    kwargs, _ = parse_server_args(parser.parse_args([]), {})
    assert "prefill_cuda_graph_max_tokens" not in kwargs
