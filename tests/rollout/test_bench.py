"""`rollout bench` end to end with tiny settings (real engine, real files, W&B offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rollout_accel.rollout.bench.cli import main
from rollout_accel.rollout.bench.report import COLUMNS
from rollout_accel.serving.server import ServerThread

TINY = [
    "--steps", "2", "--rollout-batch-size", "2", "--n-samples-per-prompt", "8",
    "--max-len", "24", "--num-prompts", "64", "--no-progress",
]  # fmt: skip


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_default_policies_results_plots_and_wandb(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    assert main([*TINY, "--out", str(out), "--wandb", "--wandb-mode", "offline"]) == 0
    res = _results(out)
    assert res["schema"] == 1 and res["workload"]["name"] == "synthetic-longtail"
    assert [row["policy"] for row in res["summary"]] == ["sync", "dynamic", "partial", "history"]
    for row in res["summary"]:
        for key, _, _ in COLUMNS:
            assert key in row
    sync = res["summary"][0]
    assert sync["speedup_vs_sync"] == pytest.approx(1.0)
    for policy, steps in res["steps"].items():
        assert len(steps) == 2, policy
        for step in steps:
            assert step["metrics"]["accel/accepted_groups"] == 2
            assert "perf/rollout_time" in step["metrics"]
            assert step["spans"] and all(s["end"] >= s["start"] for s in step["spans"])
    for name in ("timeline.png", "step_time.png", "effective_groups.png", "table.txt"):
        assert (out / name).stat().st_size > 0
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 4 and all(list(r.glob("*.wandb")) for r in runs)


def test_trace_replay(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    lines = [
        {
            "prompt": f"p{i}",
            "step": s,
            "lengths": [4 + i, 20],
            "rewards": [1, i % 2],
            "prompt_len": 8,
        }
        for i in range(6)
        for s in (0, 1)
    ]
    trace.write_text("\n".join(json.dumps(x) for x in lines))
    out = tmp_path / "out"
    assert (
        main(
            [
                *TINY,
                "--policies",
                "sync,partial",
                "--workload",
                f"trace:{trace}",
                "--no-plots",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = _results(out)
    assert res["workload"]["name"] == f"trace:{trace}"
    spans = res["steps"]["sync"][0]["spans"]
    lengths = sorted({s["tokens"] for s in spans})
    assert set(lengths) <= {4, 5, 6, 7, 8, 9, 20}  # the engine generated exactly the traced lengths


def test_engine_url_against_our_server(tmp_path: Path) -> None:
    with ServerThread(model_path="tiny-qwen3") as srv:
        out = tmp_path / "out"
        assert (
            main(
                [
                    *TINY,
                    "--policies",
                    "sync,history",
                    "--engine-url",
                    srv.url,
                    "--no-plots",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
    res = _results(out)
    assert res["engine"] == {"kind": "http", "targets": [srv.url]}
    assert {s["engine"] for s in res["steps"]["history"][1]["spans"]} == {srv.url}


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--policies", "sync,fastest"], "--policies"),
        (["--steps", "0"], "--steps"),
        (["--max-len", "3"], "--max-len"),
        (["--over-sampling", "0.5"], "--over-sampling"),
        (["--engine-url", "http://127.0.0.1:9", "--ray", "2"], "alternatives"),
        (["--bogus"], "unrecognized"),
    ],
)
def test_bad_flags_are_one_clear_line(argv, needle, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and err.startswith("rollout bench: error:")


def test_unreadable_or_malformed_trace(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(
            [
                *TINY,
                "--workload",
                f"trace:{tmp_path / 'missing.jsonl'}",
                "--out",
                str(tmp_path / "o"),
            ]
        )
    assert "cannot read" in str(exc.value)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "lengths": [3], "rewards": [1, 0]}\n')
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "--workload", f"trace:{bad}", "--out", str(tmp_path / "o2")])
    assert "bad.jsonl:1" in str(exc.value) and "rewards" in str(exc.value)


def test_recurrence_both_writes_two_results(tmp_path: Path) -> None:
    out = tmp_path / "both"
    argv = [a for a in TINY if a not in ("--num-prompts", "64")]
    assert main([*argv, "--policies", "sync,history", "--recurrence", "both", "--no-plots",
                 "--tail-budget", "2", "--out", str(out)]) == 0  # fmt: skip
    realistic, high = _results(out), json.loads((out / "results-high.json").read_text())
    assert realistic["recurrence"] == "realistic" and realistic["settings"]["num_prompts"] == 4096
    assert high["recurrence"] == "high" and high["settings"]["num_prompts"] == 128
    assert realistic["settings"]["tail_budget"] == 2.0
    for row in realistic["summary"]:
        assert "deferred_prompts" in row and "tail_cut_per_step" in row
    assert "realistic" in (out / "table.txt").read_text()


def test_drafts_turn_on_speculative_decoding_in_the_embedded_engine(tmp_path: Path) -> None:
    out = tmp_path / "d"
    assert main([*TINY, "--drafts", "--no-plots", "--out", str(out)]) == 0
    res = _results(out)
    # Every request was verified at least once per emitted token batch: the engine reported
    # speculative stats, so the controller's accepted-per-verify metric exists for some step.
    lengths = [
        step["metrics"].get("accel/spec_accept_length")
        for steps in res["steps"].values()
        for step in steps
    ]
    assert any(v is not None and v >= 1.0 for v in lengths)


def test_e2e_scenario_real_generation(tmp_path: Path) -> None:
    """The full stack on a (briefly) SFT-trained toy policy: one table, ratios to sync."""
    out = tmp_path / "e2e"
    argv = ["--scenario", "e2e", "--steps", "2", "--rollout-batch-size", "3",
            "--n-samples-per-prompt", "4", "--policies", "sync,partial,history",
            "--set", "train.sft_steps=20", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    res = _results(out)
    assert res["scenario"] == "e2e" and res["task"] == "arithmetic"
    rows = {r["policy"]: r for r in res["summary"]}
    assert set(rows) == {"sync", "partial", "history"}
    assert rows["sync"]["speedup_vs_sync"] == pytest.approx(1.0)
    for policy, steps in res["steps"].items():
        assert len(steps) == 2, policy
        for step in steps:
            assert step["metrics"]["accel/accepted_groups"] == 3
            assert step["metrics"]["accel/generated_tokens"] > 0
    assert "resp len" in (out / "table.txt").read_text()
    assert main([*argv[:-2], "--drafts", "--out", str(tmp_path / "e2e-d")]) == 0
    drafted = _results(tmp_path / "e2e-d")
    assert any(r.get("spec_accept_length") for r in drafted["summary"])
