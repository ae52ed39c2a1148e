"""`rollout bench --scenario kvreuse` end to end on a small stream (tiny-qwen3, CPU)."""

from __future__ import annotations

import json

from rollout_accel.rollout.bench.cli import main


def test_kvreuse_scenario_writes_results_and_r1_is_exact(tmp_path, capsys) -> None:
    code = main(
        [
            "--scenario", "kvreuse", "--models", "tiny-qwen3", "--ratios", "0.15,1",
            "--greedy-steps", "4", "--agents", "3", "--rounds", "2",
            "--document-tokens", "40", "--output-tokens", "20", "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert code == 0
    res = json.loads((tmp_path / "kvreuse.json").read_text())["results"][0]
    assert res["model"] == "tiny-qwen3" and res["prompts"] == 6
    assert res["reusable_share"] >= 0.5 and res["prompts_with_reuse"] >= 4
    low, full = res["curve"]
    assert low["ratio"] == 0.15 and full["ratio"] == 1.0
    assert low["computed_tokens"] < full["computed_tokens"] == res["baseline"]["computed_tokens"]
    assert low["reuse_ratio"] > 0.3 and low["recomputed_reused_tokens"] > 0
    assert full["quality"]["kl_max"] == 0.0 and full["quality"]["greedy_exact"] == 1.0
    assert "speedup" in capsys.readouterr().out


def test_kvreuse_scenario_rejects_bad_ratios(tmp_path, capsys) -> None:
    assert main(["--scenario", "kvreuse", "--ratios", "0.2,1.5", "--out", str(tmp_path)]) == 2
    assert "--ratios" in capsys.readouterr().out
