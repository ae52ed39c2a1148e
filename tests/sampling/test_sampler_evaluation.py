"""The evaluation module runs end to end (tiny sizes) and prints its table last."""

from __future__ import annotations

import json

import numpy as np

from rollout_accel.sampling.evaluation import main, spearman


def test_spearman_handles_ties_and_order():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert spearman(x, x * 10) == 1.0
    assert spearman(x, -x) == -1.0
    assert abs(spearman(np.array([1.0, 1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0]))) < 1.0


def test_evaluation_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    args = [
        "--num-prompts", "96", "--batch", "16", "--steps", "12",
        "--timing-prompts", "2048", "--timing-steps", "2", "--draft-prompts", "2",
        "--out", str(out), "--workdir", str(tmp_path / "work"),
    ]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].lstrip().startswith("(CPU ms median record / score")
    assert any(line.startswith("uniform ") for line in printed)
    report = json.loads(out.read_text())
    assert set(report["policies"]) >= {"uniform", "selector", "oracle (ceiling)"}
    assert report["policies"]["uniform"]["gain_vs_uniform"] == 1.0
    assert report["trace"]["median_length_at_reference_cap"] == 1160
    assert report["timing"]["record_1024x16_ms_median"] > 0
