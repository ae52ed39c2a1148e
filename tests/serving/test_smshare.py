"""SM sharing on the CPU: the planner's math on synthetic latency tables, the runner's fallback
(exactly ModelRunner) and its two-part decomposition (`split` mode), config and flag validation.
GPU checks (disjoint partitions, identical outputs) are in test_smshare_gpu.py."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from rollout_accel.serving.engine import Engine
from rollout_accel.serving.engine.config import EngineConfig
from rollout_accel.serving.smshare.concurrent_step import SmShareRunner
from rollout_accel.serving.smshare.partitions import open_partitions, unsupported_reason
from rollout_accel.serving.smshare.planner import (
    WHOLE,
    WHOLE_NAME,
    LatencyModel,
    LatencyTable,
    Planner,
)

# Synthetic cost model by configuration: decode (a, b per row, c per context token),
# prefill (a, b per token, c per token^2). Presets 0..2 = 120/12, 104/28, 88/44 of 132 SMs.
TOTAL = 132
SPLITS = {0: (120, 12), 1: (104, 28), 2: (88, 44)}


def _coefs(prefill_sms: int, decode_sms: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    dec = (TOTAL / decode_sms) ** 0.2  # bandwidth-bound: weak in SMs (28 SMs: 1.36x)
    pre = TOTAL / prefill_sms  # compute-bound: linear in SMs
    return (1e-3 * dec, 4e-6 * dec, 2e-8 * dec), (2e-4 * pre, 1.5e-6 * pre, 1e-11 * pre)


def _table() -> LatencyTable:
    table = LatencyTable(names={WHOLE: "whole"}, switch_overhead_s=2e-5)
    configs = {WHOLE: (TOTAL, TOTAL), **SPLITS}
    for cfg, (p_sms, d_sms) in configs.items():
        (da, db, dc), (pa, pb, pc) = _coefs(p_sms, d_sms)
        table.decode[cfg] = [
            (b, b * c, da + db * b + dc * b * c) for b in (8, 64, 256) for c in (256, 2048)
        ]
        table.prefill[cfg] = [(n, pa + pb * n + pc * n * n) for n in (256, 1024, 4096)]
        if cfg != WHOLE:
            table.names[cfg] = f"{p_sms}/{d_sms}"
    return table


def test_latency_model_recovers_the_synthetic_costs() -> None:
    model = LatencyModel(_table())
    assert model.presets == [0, 1, 2]
    for cfg, (p_sms, d_sms) in {WHOLE: (TOTAL, TOTAL), **SPLITS}.items():
        (da, db, dc), (pa, pb, pc) = _coefs(p_sms, d_sms)
        assert model.decode(cfg, 100, 100 * 3000) == pytest.approx(da + db * 100 + dc * 3e5)
        assert model.prefill(cfg, 3000) == pytest.approx(pa + pb * 3000 + pc * 9e6)


def _brute_force(model: LatencyModel, batch: int, ctx: int, tokens: int) -> tuple[str, float]:
    options = {WHOLE_NAME: model.sequential(batch, ctx, tokens)}
    for p in model.presets:
        options[model.table.names[p]] = model.concurrent(p, batch, ctx, tokens)
    name = min(options, key=options.__getitem__)
    return name, options[name]


@pytest.mark.parametrize(
    ("batch", "ctx_per_row", "tokens"),
    [(256, 4096, 2048), (256, 8192, 1024), (8, 128, 4096), (64, 1024, 512), (200, 2000, 8192)],
)
def test_adaptive_choice_is_the_fastest_option(batch: int, ctx_per_row: int, tokens: int) -> None:
    planner = Planner(LatencyModel(_table()), tpot_bound_s=10.0)
    choice = planner.choose(batch, batch * ctx_per_row, tokens)
    best, best_t = _brute_force(planner.model, batch, batch * ctx_per_row, tokens)
    assert planner.name(choice.preset) == best
    assert choice.predicted_s == pytest.approx(best_t)
    assert choice.within_bound


def test_heavy_decode_shares_sms_and_light_decode_time_shares() -> None:
    planner = Planner(LatencyModel(_table()), tpot_bound_s=1.0)
    heavy = planner.choose(256, 256 * 512, 3072)  # decode and prefill of similar cost
    light = planner.choose(4, 4 * 64, 8192)  # a long prefill beside a tiny decode batch
    assert heavy.concurrent and not light.concurrent
    assert heavy.predicted_s < planner.model.sequential(256, 256 * 512, 3072)


def test_one_side_empty_time_shares_and_static_is_fixed() -> None:
    planner = Planner(LatencyModel(_table()), tpot_bound_s=1.0)
    assert planner.choose(0, 0, 4096).preset is None
    assert planner.choose(128, 128 * 512, 0).preset is None
    static = Planner(LatencyModel(_table()), tpot_bound_s=1.0, static_preset=2)
    assert static.choose(4, 4 * 64, 8192).preset == 2
    assert static.choose(4, 4 * 64, 0).preset is None
    # WHOLE as the fixed choice is the sequential baseline: always the whole GPU, predicted as
    # decode then prefill there, even where a preset would be faster.
    sequential = Planner(LatencyModel(_table()), tpot_bound_s=1.0, static_preset=WHOLE)
    shape = (256, 256 * 512, 3072)
    whole = sequential.choose(*shape)
    assert whole.preset is None
    assert whole.predicted_s == pytest.approx(sequential.model.sequential(*shape))
    assert planner.choose(*shape).predicted_s < whole.predicted_s
    assert sequential.metrics()["sm_share/steps/whole"] == 1


def test_measured_steps_correct_the_model_and_can_change_the_choice() -> None:
    planner = Planner(LatencyModel(_table()), tpot_bound_s=1.0)
    shape = (256, 256 * 512, 3072)
    first = planner.choose(*shape)
    assert first.concurrent and first.raw_s == pytest.approx(first.predicted_s)
    for _ in range(30):  # the co-run is much slower than its sides alone predicted
        planner.observe(first, measured_s=3.0 * first.raw_s)
    assert planner.correction[first.preset] == pytest.approx(3.0, rel=0.01)
    # Unmeasured presets borrow the measured presets' contention; the whole GPU keeps its own.
    others = [p for p in planner.model.presets if p != first.preset]
    assert all(planner.factor(p) == pytest.approx(3.0, rel=0.01) for p in others)
    assert planner.factor(None) == 1.0
    second = planner.choose(*shape)
    assert second.preset is None  # not a walk through the other, equally contended presets
    assert second.preset != first.preset
    assert second.predicted_s <= 3.0 * first.raw_s
    metrics = planner.metrics()
    assert metrics[f"sm_share/correction/{planner.name(first.preset)}"] == pytest.approx(3.0, 0.01)
    planner.observe(second, measured_s=1e9)  # clipped: one outlier cannot blow the factor up
    assert planner.correction[second.preset] <= 0.8 + 0.2 * 4.0


def test_bound_misses_and_metrics() -> None:
    planner = Planner(LatencyModel(_table()), tpot_bound_s=1e-4)
    choice = planner.choose(256, 256 * 4096, 4096)
    assert not choice.within_bound
    metrics = planner.metrics()
    assert metrics["sm_share/tpot_bound_misses"] == 1
    assert sum(v for k, v in metrics.items() if k.startswith("sm_share/steps/")) == 1


def test_prefill_budget_keeps_the_step_under_the_bound() -> None:
    planner = Planner(LatencyModel(_table()), tpot_bound_s=0.02)
    budget = planner.prefill_budget(256, 256 * 1024, granularity=64)
    assert budget > 0
    assert _brute_force(planner.model, 256, 256 * 1024, budget)[1] <= 0.02
    assert _brute_force(planner.model, 256, 256 * 1024, budget + 64)[1] > 0.02
    tight = Planner(LatencyModel(_table()), tpot_bound_s=1e-4)
    assert tight.prefill_budget(256, 256 * 4096) == 0


def test_planner_refuses_bad_settings() -> None:
    model = LatencyModel(_table())
    with pytest.raises(ValueError, match="sm_share_tpot_ms"):
        Planner(model, tpot_bound_s=0.0)
    with pytest.raises(ValueError, match="static preset 7"):
        Planner(model, 1.0, static_preset=7)
    incomplete = _table()
    del incomplete.prefill[WHOLE]
    with pytest.raises(ValueError, match="WHOLE"):
        LatencyModel(incomplete)


def test_partitions_unavailable_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert "cpu" in (unsupported_reason(cpu) or "")
    partitions, reason = open_partitions(cpu)
    assert partitions is None and "cpu" in reason


# -- the runner on the CPU ----------------------------------------------------------------------
def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    lens = [40, 3, 70, 25, 9, 55, 31, 17]
    return [torch.randint(0, 500, (n,), generator=gen).tolist() for n in lens]


def _run(eng: Engine, mode: str | None = None) -> list[dict]:
    if mode is not None:
        eng.loop.call(lambda: eng.runner.set_mode(mode))
    return eng.generate(
        input_ids=_prompts(),
        sampling_params={"temperature": 0, "max_new_tokens": 12, "ignore_eos": True},
        return_logprob=True,
        logprob_start_len=0,
    )


def test_runner_on_cpu_is_model_runner_and_split_matches() -> None:
    with Engine("tiny-qwen3", device="cpu", dtype="float32", max_prefill_tokens=24) as eng:
        ref = _run(eng)
    with Engine(
        "tiny-qwen3", device="cpu", dtype="float32", max_prefill_tokens=24, sm_share=True
    ) as eng:
        runner = eng.runner
        assert isinstance(runner, SmShareRunner)
        assert not runner.available and "cpu" in (runner.unavailable_reason or "")
        assert runner.mode == "time-share"
        same = _run(eng)
        eng.flush_cache()
        split = _run(eng, "split")
        assert runner.split_steps > 0  # mixed steps really ran as two parts
    for a, b, c in zip(ref, same, split, strict=True):
        assert a["output_ids"] == b["output_ids"] == c["output_ids"]
        lp_a = np.array([x[0] for x in a["meta_info"]["output_token_logprobs"]])
        lp_c = np.array([x[0] for x in c["meta_info"]["output_token_logprobs"]])
        assert np.allclose(lp_a, lp_c, atol=1e-4)
        in_a = [x[0] for x in a["meta_info"]["input_token_logprobs"][1:]]
        in_c = [x[0] for x in c["meta_info"]["input_token_logprobs"][1:]]
        assert np.allclose(in_a, in_c, atol=1e-4)


def test_runner_refuses_unknown_mode() -> None:
    with Engine("tiny-qwen3", device="cpu", sm_share=True) as eng:
        with pytest.raises(ValueError, match="sm_share mode"):
            eng.runner.set_mode("fastest")
        eng.runner.set_mode("adaptive")  # no partitions: falls back to time-sharing
        assert eng.runner.mode == "time-share"


# -- config and flags ---------------------------------------------------------------------------
def test_config_validation_names_the_field() -> None:
    assert EngineConfig.from_kwargs(sm_share=True, sm_share_tpot_ms=20).sm_share
    with pytest.raises(ValueError, match="sm_share:"):
        EngineConfig.from_kwargs(sm_share="yes")
    for bad in (0, -5.0, "fast", True):
        with pytest.raises(ValueError, match="sm_share_tpot_ms"):
            EngineConfig.from_kwargs(sm_share_tpot_ms=bad)


def test_serve_flag_turns_sm_sharing_on() -> None:
    from rollout_accel.serving.server.server_args import add_server_args, parse_server_args

    parser = argparse.ArgumentParser()
    add_server_args(parser)
    kwargs, _ = parse_server_args(
        parser.parse_args(["--enable-sm-share", "--sm-share-tpot-ms", "30"]), {}
    )
    assert kwargs["sm_share"] is True and kwargs["sm_share_tpot_ms"] == 30.0
    kwargs, _ = parse_server_args(parser.parse_args([]), {})
    assert "sm_share" not in kwargs


def test_bench_scenario_exits_clearly_without_green_contexts(capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the scenario would run")
    from rollout_accel.rollout.bench.cli import main

    assert main(["--scenario", "smshare"]) == 2
    assert "green contexts are unavailable" in capsys.readouterr().err


def test_bench_workload_is_seeded_and_rollout_shaped() -> None:
    from rollout_accel.rollout.bench.smshare_scenario import build_parser, make_workload

    args = build_parser().parse_args(["--arrivals", "30", "--background", "8"])
    one, two = make_workload(args, 151_936), make_workload(args, 151_936)
    assert [a.input_ids for a in one.arrivals] == [a.input_ids for a in two.arrivals]
    kinds = {a.kind for a in one.arrivals}
    assert kinds == {"long", "resumed", "multiturn"}
    offsets = [a.offset_s for a in one.arrivals]
    assert offsets == sorted(offsets)
    dense = np.diff(offsets[:20]).mean()
    sparse = np.diff(offsets[20:]).mean()
    assert sparse > dense  # the mix shifts from prefill-heavy to decode-heavy
    resumed = next(a for a in one.arrivals if a.kind == "resumed")
    assert any(resumed.input_ids[: len(b)] == b for b in one.background)
