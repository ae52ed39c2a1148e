"""Tracker: a real W&B offline run on disk, the JSONL log, mode resolution, no-wandb fallback."""

from __future__ import annotations

import json
import sys
import time

import pytest

from rollout_accel.rollout.tracking import STEP_KEYS, Tracker, resolve_wandb_mode


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_offline_wandb_run_writes_its_files(tmp_path) -> None:
    pytest.importorskip("wandb")
    with Tracker(
        tmp_path, project="rollout-accel-test", name="offline-check", mode="offline"
    ) as tracker:
        assert tracker.mode == "offline"
        for step in range(3):
            tracker.log(
                {"rollout/raw_reward": 0.25 * step, "train/loss": 1.0 + 0.012345 * step},
                step=step,
            )
        tracker.log({"eval/accuracy": 0.987654}, step=3)
        tracker.summary({"final_eval_accuracy": 0.987654})
        run_dir = tracker.wandb_dir
    assert run_dir is not None and run_dir.parent == tmp_path / "wandb"
    assert run_dir.name.startswith("offline-run-")
    (data_file,) = run_dir.glob("run-*.wandb")
    # The run's records are protobuf; metric names and JSON-encoded values are stored verbatim.
    needles = [b"rollout/raw_reward", b"train/loss", b"eval/accuracy", b"0.987654"]
    needles += [axis.encode() for axis in STEP_KEYS]
    # wandb-core closes the file from its own process, which can lag `finish()` on a busy box.
    deadline = time.monotonic() + 60
    while True:
        data = data_file.read_bytes()
        missing = [n for n in needles if n not in data]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not missing, missing
    assert (run_dir / "logs").is_dir()


def test_jsonl_records_carry_slime_step_keys(tmp_path) -> None:
    tracker = Tracker(tmp_path, mode="disabled")
    tracker.log({"rollout/raw_reward": 0.5}, step=7)
    tracker.log({"train/loss": float("nan"), "train/step": 3}, step=8)
    tracker.summary({"final": 1.0})
    tracker.finish()
    first, second, summary = _records(tmp_path / "metrics.jsonl")
    assert first == {
        "rollout/raw_reward": 0.5,
        "rollout/step": 7,
        "train/step": 7,
        "eval/step": 7,
    }
    assert second["train/step"] == 3  # an explicit step key is kept
    assert second["rollout/step"] == 8
    assert second["train/loss"] is None  # NaN has no JSON spelling
    assert summary == {"summary": {"final": 1.0}}
    assert not (tmp_path / "wandb").exists()
    with pytest.raises(RuntimeError, match="after finish"):
        tracker.log({"x": 1.0})


def test_works_without_wandb_installed(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    tracker = Tracker(tmp_path, mode="offline")
    assert tracker.mode == "disabled" and "not installed" in (tracker.note or "")
    tracker.log({"rollout/raw_reward": 1.0}, step=0)
    tracker.finish()
    assert _records(tmp_path / "metrics.jsonl")[0]["rollout/raw_reward"] == 1.0
    assert tracker.wandb_dir is None


@pytest.mark.parametrize(
    ("mode", "env", "expected"),
    [
        ("auto", {}, "offline"),
        (None, {"WANDB_API_KEY": "k"}, "online"),
        ("auto", {"WANDB_API_KEY": "k", "WANDB_MODE": "offline"}, "offline"),
        ("auto", {"WANDB_MODE": "disabled"}, "disabled"),
        ("offline", {"WANDB_API_KEY": "k"}, "offline"),
        ("online", {}, "online"),
    ],
)
def test_wandb_mode_resolution(mode, env, expected, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert resolve_wandb_mode(mode) == expected


def test_unknown_wandb_mode_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="'sometimes'"):
        Tracker(tmp_path, mode="sometimes")
