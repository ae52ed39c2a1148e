"""SM sharing on a GPU with green contexts: partitions are disjoint (%smid), no handle leak, and
SM-shared greedy outputs equal the same decomposition run sequentially.

Marked `gpu`: skipped without CUDA (and without green contexts); run by scripts/gpu_tests.sh
tests/serving/test_smshare_gpu.py, or scripts/gpu_smshare.py for the full report.
"""

from __future__ import annotations

import pytest
import torch

from rollout_accel.serving.smshare.partitions import unsupported_reason

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


@pytest.fixture(scope="module")
def device() -> torch.device:
    dev = torch.device("cuda", 0)
    why = unsupported_reason(dev)
    if why is not None:
        pytest.skip(f"green contexts unavailable: {why}")
    return dev


def test_partitions_are_disjoint_by_smid(device: torch.device, monkeypatch) -> None:
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "gpu_smshare.py"
    monkeypatch.syspath_prepend(str(path.parent))  # the script imports its sibling repo_path
    spec = importlib.util.spec_from_file_location("gpu_smshare", path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    result = script.part_a(torch)
    assert result["presets"], "no preset was made"
    for row in result["presets"]:
        assert row["overlap"] == 0 and row["overlap_concurrent"] == 0, row
        assert row["prefill_within_quota"] and row["decode_within_quota"], row


def test_switches_and_close_leak_nothing(device: torch.device) -> None:
    from rollout_accel.serving.smshare.partitions import PartitionSet, live_handles

    before = live_handles()
    ps = PartitionSet.create(device)
    assert live_handles()["streams"] == before["streams"] + 2 * len(ps.presets)
    x = torch.zeros(16, device=device)
    main = torch.cuda.current_stream(device)
    for i in range(1000):
        preset = ps.presets[i % len(ps.presets)]
        preset.decode.stream.wait_stream(main)
        with torch.cuda.stream(preset.decode.stream):
            x[:8].add_(1)
        main.wait_stream(preset.decode.stream)
    ps.close()
    assert float(x[0]) == 1000.0
    assert live_handles() == before


@pytest.mark.parametrize(("model", "dtype"), [("tiny-qwen3", "float32")])
def test_concurrent_outputs_equal_the_plain_runner(
    device: torch.device, model: str, dtype: str
) -> None:
    """Greedy and seeded temperature-1 outputs with SM sharing (every preset, adaptive, and the
    sequential whole-GPU graphs) are the eager runner's (one merged forward per mixed step),
    token for token, in fp32; and the concurrent path really ran (its steps counted, the
    process alive after)."""
    from rollout_accel.serving.engine import Engine

    gen = torch.Generator().manual_seed(7)
    prompts = [
        torch.randint(0, 500, (int(n),), generator=gen).tolist() for n in (300, 20, 180, 90, 5)
    ]
    greedy = {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True}
    sampled = {"temperature": 1.0, "sampling_seed": 11, "max_new_tokens": 32, "ignore_eos": True}
    with Engine(model, dtype=dtype, device="cuda", max_prefill_tokens=64, sm_share=True) as eng:
        runner = eng.runner
        assert runner.available, runner.unavailable_reason

        def run(params: dict, mode: str, preset: int | None = None) -> list[list[int]]:
            eng.loop.call(lambda: runner.set_mode(mode, preset))
            eng.flush_cache()
            return [
                o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=params)
            ]

        for params in (greedy, sampled):
            plain = run(params, "eager")  # one eager forward per mixed step
            assert run(params, "time-share") == plain  # the engine's default: chunk graphs
            assert run(params, "split") == plain
            before = runner.sequential_steps
            assert run(params, "sequential") == plain
            assert runner.sequential_steps > before
            for preset in runner.partitions.presets:
                before = runner.concurrent_steps
                assert run(params, "static", preset.index) == plain, preset.name
                assert runner.concurrent_steps > before, preset.name
            assert run(params, "adaptive") == plain
        assert eng.alive
