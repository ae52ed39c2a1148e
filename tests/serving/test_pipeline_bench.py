"""The pipeline bench end to end on tiny runs: `rollout bench --scenario pipeline --reference`
(every mode's results, pp = 1 first, the same tokens in every mode, JSON written) and the GPU
script's CPU smoke (`scripts/gpu_pipeline_bench.py --device cpu`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from rollout_accel.rollout.bench.cli import main
from rollout_accel.rollout.bench.pipeline_scenario import compare_tokens

ROOT = Path(__file__).resolve().parents[2]


def test_pipeline_scenario_smoke(tmp_path: Path, capsys) -> None:
    out = tmp_path / "pp.json"
    argv = ["--scenario", "pipeline", "--model", "tiny-qwen3", "--num-seqs", "4"]
    argv += ["--max-len", "12", "--reference", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result["modes"]) == {"even", "dynamic", "even-again", "best-static"}
    assert set(result["greedy"]) == {"even", "even-1mb", "dynamic"}
    assert set(result["reference_pp1"]) == {"top-p", "greedy"}
    assert all(result["tokens_identical"].values())
    # float32 on the CPU: pp = 2 gives pp = 1's tokens, with and without micro-batches.
    assert all(c["identical"] for c in result["vs_pp1"].values()), result["vs_pp1"]
    for run in [*result["modes"].values(), *result["greedy"].values()]:
        assert run["steps"] > 0 and run["output_tokens"] > 0
        assert len(run["bubble_per_stage"]) == 2
        assert all(0.0 <= b <= 1.0 for b in run["bubble_per_stage"])
    assert result["greedy"]["even-1mb"]["micro_batches"] == 1
    assert result["greedy"]["even"]["micro_batches"] == 2
    text = capsys.readouterr().out
    assert "tokens identical across pp=2 modes: yes" in text
    assert "pp=1 (eager)" in text


def test_gpu_script_cpu_smoke(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_pipeline_bench.py"), "--device", "cpu"]
    cmd += ["--model", "tiny-qwen3", "--num-seqs", "3", "--max-len", "8", "--no-greedy"]
    cmd += ["--cuda-graph"]  # the graph runs' layout (graphs are a no-op on the CPU: eager)
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].endswith("importing torch") and "pp=2 engine built" in proc.stdout
    assert lines[-1].startswith("dynamic-graph timeline")  # the table comes last
    assert "pp=1 (graphs)" in proc.stdout
    result = json.loads((tmp_path / "gpu_pipeline_bench.json").read_text())
    assert result["dtype"] == "float32" and result["reference_pp1"]["top-p"]["steps"] > 0
    assert set(result["modes"]) >= {"even", "even-graph", "dynamic-graph", "even-graph-again"}
    assert "even-graph-1mb" in result["greedy"]
    assert result["tokens_identical"] and all(result["tokens_identical"].values())
    # float32 and no graphs on the CPU: every run agrees, the reported ones included.
    assert all(c["identical"] for c in result["graphs_vs_eager"].values())
    assert not any(r["cuda_graphs"] for r in result["modes"].values())


def test_compare_tokens_counts_the_prefix_before_a_difference() -> None:
    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    same = compare_tokens(ref, [[1, 2, 3, 4], [5, 6, 7, 8]])
    assert same["identical"] and same["prefix_token_share"] == 1.0
    assert same["first_divergence"] is None
    diff = compare_tokens(ref, [[1, 2, 3, 4], [5, 9, 7, 8]])
    assert not diff["identical"] and diff["identical_seqs"] == 1
    assert diff["prefix_token_share"] == 5 / 8 and diff["first_divergence"] == 1
