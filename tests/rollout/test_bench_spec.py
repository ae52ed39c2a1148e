"""`rollout bench --scenario spec` end to end with tiny settings, and the serve flags."""

from __future__ import annotations

import json

import pytest

from rollout_accel.rollout.bench.cli import main
from rollout_accel.rollout.cli import build_parser, engine_kwargs


def test_spec_scenario_reports_identical_outputs(tmp_path, capsys) -> None:
    out = tmp_path / "spec"
    code = main(
        [
            "--scenario",
            "spec",
            "--prompts",
            "2",
            "--samples",
            "2",
            "--epochs",
            "2",
            "--out-len",
            "24",
            "--max-running",
            "4",
            "--repeats",
            "1",
            "--logit-scale",
            "64",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads((out / "spec_bench.json").read_text())
    (row,) = result["epochs"]
    assert row["identical"] == row["sequences"] == 4
    assert row["tokens"] == 4 * 24
    assert row["tokens_per_verify"] >= 1.0 and 0.0 <= row["draft_hit_rate"] <= 1.0
    assert row["plain_tok_s"] > 0 and row["spec_tok_s"] > 0
    assert "tok/verify" in capsys.readouterr().out


def test_spec_scenario_bad_flag_is_one_line(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--scenario", "spec", "--epochs", "1"])
    assert "--epochs" in capsys.readouterr().err


def test_serve_takes_speculative_flags() -> None:
    from rollout_accel.serving.server.server_args import ServerArgsError, parse_server_args

    parser = build_parser()
    args = parser.parse_args(
        ["serve", "--speculative-algorithm", "ngram", "--speculative-num-draft-tokens", "4"]
    )
    kwargs, _ = parse_server_args(args, engine_kwargs(args))
    assert kwargs["speculative_algorithm"] == "NGRAM"
    assert kwargs["speculative_num_draft_tokens"] == 4
    args = parser.parse_args(["serve", "--speculative-algorithm", "EAGLE"])
    with pytest.raises(ServerArgsError, match="--speculative-algorithm=EAGLE"):
        parse_server_args(args, engine_kwargs(args))
