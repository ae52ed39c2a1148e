"""`rollout bench --scenario pipeline` end to end on a tiny run: every mode's results, the same
tokens in every mode, JSON written."""

from __future__ import annotations

import json
from pathlib import Path

from rollout_accel.rollout.bench.cli import main


def test_pipeline_scenario_smoke(tmp_path: Path, capsys) -> None:
    out = tmp_path / "pp.json"
    argv = ["--scenario", "pipeline", "--model", "tiny-qwen3", "--num-seqs", "4"]
    argv += ["--max-len", "12", "--no-greedy", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result["modes"]) == {"even", "best-static", "dynamic"}
    assert all(result["tokens_identical"].values())
    for run in result["modes"].values():
        assert run["steps"] > 0 and run["output_tokens"] > 0
        assert len(run["bubble_per_stage"]) == 2
        assert all(0.0 <= b <= 1.0 for b in run["bubble_per_stage"])
    assert "tokens identical across modes: yes" in capsys.readouterr().out
