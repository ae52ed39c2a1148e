"""HistoryStore on a real SQLite file: summaries, raw history, checkpoints, concurrency, and
every kind of bad input (which must raise a specific error and leave the history unchanged)."""

from __future__ import annotations

import math
import multiprocessing as mp
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rollout_accel.sampling import (
    CheckpointNotFoundError,
    GroupOutcome,
    GroupRecord,
    HistoryConfig,
    HistoryFormatError,
    HistorySchemaError,
    HistoryStore,
    InvalidArgumentError,
    InvalidConfigError,
    InvalidPromptKeyError,
    InvalidRecordError,
    ReadOnlyHistoryError,
    UnknownPromptError,
    prompt_key_for_tokens,
)

PASS, FAIL, MIXED = [1.0] * 4, [0.0] * 4, [1.0, 0.0, 0.0, 1.0]


def test_summary_tracks_streak_pass_counts_and_lengths(store, make_group):
    cfg = store.config
    out = store.record_groups(0, [make_group(7, FAIL, [10, 20, 30, 40], prompt_length=55)])
    assert out == [GroupOutcome.ALL_FAIL]
    store.record_groups(1, [make_group(7, FAIL)])
    st = store.stats(7)
    assert (st.groups, st.samples, st.zero_var_streak, st.zero_var_groups) == (2, 8, 2, 2)
    assert st.last_outcome is GroupOutcome.ALL_FAIL
    assert (st.first_step, st.last_step, st.prompt_length) == (0, 1, 55)
    assert st.pass_successes == 0.0
    assert st.pass_trials == pytest.approx(4 * cfg.decay + 4)

    assert store.record_groups(2, [make_group(7, MIXED)]) == [GroupOutcome.MIXED]
    st = store.stats(7)
    assert st.zero_var_streak == 0 and st.last_outcome is GroupOutcome.MIXED
    assert st.pass_successes == pytest.approx(2.0)
    # Discounted log-length mean: two groups at log(100) after one with logs of 10..40.
    d = cfg.decay
    logs0 = np.log([10, 20, 30, 40])
    expect = (d * d * logs0.sum() + (d + 1) * 4 * math.log(100)) / (d * d * 4 + (d + 1) * 4)
    assert st.length_log_mean == pytest.approx(expect)
    assert st.pass_rate(0.5, 2.0) == pytest.approx((1 + 2) / (2 + st.pass_trials))


def test_aborted_samples_do_not_count(store, make_group):
    store.record_groups(0, [make_group(1, FAIL)])
    # All aborted: no evidence, the streak stands; the raw group is still kept.
    out = store.record_groups(1, [make_group(1, PASS, finish_reasons=["abort"] * 4)])
    assert out == [GroupOutcome.EMPTY]
    st = store.stats(1)
    assert st.zero_var_streak == 1 and st.groups == 2 and st.pass_successes == 0.0
    # Aborted samples drop out of the outcome: the remaining ones all failed.
    reasons = ["stop", "stop", "abort", "length"]
    out = store.record_groups(2, [make_group(1, [0.0, 0.0, 1.0, 0.0], finish_reasons=reasons)])
    assert out == [GroupOutcome.ALL_FAIL]
    hist = store.group_history(1)
    assert [h.step for h in hist] == [0, 1, 2]
    assert hist[2].finish_reasons == tuple(reasons)
    assert hist[2].truncated == (False, False, False, True)  # default: finish reason "length"


def test_int_and_str_keys_are_distinct_and_token_hash_is_stable(store, make_group):
    key = prompt_key_for_tokens([1, 2, 3])
    assert key == prompt_key_for_tokens(np.array([1, 2, 3]))
    assert key != prompt_key_for_tokens([1, 2, 4])
    store.record_groups(0, [make_group(1, PASS), make_group("1", FAIL), make_group(key, MIXED)])
    stats = store.prompt_stats([1, "1", key, 999])
    assert stats[1].last_outcome is GroupOutcome.ALL_PASS
    assert stats["1"].last_outcome is GroupOutcome.ALL_FAIL
    assert 999 not in stats  # new prompts are simply absent
    assert store.num_prompts() == 3


def test_group_history_round_trips_raw_values(store, make_group):
    rewards = [0.25, -1.0, 3.5, 0.0]
    store.record_groups(
        4,
        [
            make_group(
                "p",
                rewards,
                [5, 0, 17, 4096],
                finish_reasons=[{"type": "stop"}, "stop", "abort", "length"],
                truncated=[False, False, False, True],
                weight_version=12,
            )
        ],
    )
    (entry,) = store.group_history("p")
    assert entry.rewards == tuple(rewards)
    assert entry.lengths == (5, 0, 17, 4096)
    assert entry.finish_reasons == ("stop", "stop", "abort", "length")
    assert entry.weight_version == "12" and store.stats("p").weight_version == "12"


def test_responses_are_bounded_per_prompt(tmp_path, make_group):
    cfg = HistoryConfig(max_responses_per_prompt=3, max_response_tokens=4)
    with HistoryStore(tmp_path / "h.db", cfg) as s:
        for step in range(2):
            tokens = [[step * 10 + j] * (j + 3) for j in range(4)]
            s.record_groups(step, [make_group(1, MIXED, responses=tokens)])
        kept = [r.tolist() for r in s.responses(1)]
        # 8 responses recorded, the latest 3 kept (oldest first), each cut to 4 tokens.
        assert kept == [[11] * 4, [12] * 4, [13] * 4]
        assert s.keys_with_responses() == [1]
        assert s.stats(1).responses_stored == 8


def test_save_and_load_round_trip(tmp_path, make_group):
    with HistoryStore(tmp_path / "h.db") as s:
        s.record_groups(0, [make_group(k, FAIL if k % 2 else MIXED) for k in range(20)])
        s.put_state("selector", {"explore": 0.25})
        before = s.prompt_stats(range(20))
        snapshot = s.save(3)
        assert snapshot == tmp_path / "h.db.checkpoints" / "history_3.db"
        s.record_groups(5, [make_group(k, PASS) for k in range(30)])
        s.put_state("selector", {"explore": 0.9})
        assert s.num_prompts() == 30

        s.load(3)
        assert s.prompt_stats(range(30)) == before
        assert s.latest_step() == 0 and s.num_groups() == 20
        assert s.get_state("selector") == {"explore": 0.25}
        # Recording resumes from the restored state.
        s.record_groups(1, [make_group(1, FAIL)])
        assert s.stats(1).zero_var_streak == 2

    # A snapshot is a standalone file that opens as a history by itself.
    with HistoryStore(snapshot, readonly=True) as snap:
        assert snap.num_prompts() == 20
    other = tmp_path / "slime" / "rollout"
    with HistoryStore(tmp_path / "h.db") as s:
        assert s.save(7, other) == other / "history_7.db"


def test_load_refuses_missing_or_corrupt_snapshots_and_keeps_live_data(tmp_path, make_group):
    with HistoryStore(tmp_path / "h.db") as s:
        s.record_groups(0, [make_group(1, MIXED)])
        with pytest.raises(CheckpointNotFoundError, match="rollout_id 9"):
            s.load(9)
        bad = s.checkpoint_path(4, None)
        bad.parent.mkdir(parents=True)
        bad.write_bytes(b"\x00garbage" * 512)
        with pytest.raises(HistoryFormatError):
            s.load(4)
        with pytest.raises(InvalidArgumentError):
            s.save(-1)
        assert s.stats(1).groups == 1 and s.num_groups() == 1


def _read_loop(path: str, keys: int, steps: int, queue: mp.Queue, ready: object) -> None:
    """Reader process: every snapshot must show one step fully applied or not at all."""
    seen = set()
    try:
        with HistoryStore(path, readonly=True) as s:
            s.prompt_stats(range(keys))
            ready.set()  # type: ignore[attr-defined]
            while True:
                stats = s.prompt_stats(range(keys))
                counts = {st.groups for st in stats.values()}
                if len(counts) > 1 or (stats and len(stats) != keys):
                    queue.put(("torn", sorted(counts), len(stats)))
                    return
                done = counts.pop() if counts else 0
                seen.add(done)
                if done == steps:
                    queue.put(("ok", sorted(seen), 0))
                    return
    except Exception as exc:  # report, don't hang the test
        queue.put(("error", repr(exc), 0))


def test_concurrent_reader_process_sees_whole_steps(tmp_path, make_group):
    path = tmp_path / "h.db"
    keys, steps = 200, 30
    with HistoryStore(path) as s:
        s.record_groups(0, [make_group(k, MIXED) for k in range(keys)])
        ctx = mp.get_context("spawn")
        queue, ready = ctx.Queue(), ctx.Event()
        reader = ctx.Process(target=_read_loop, args=(str(path), keys, steps, queue, ready))
        reader.start()
        assert ready.wait(timeout=60)
        for step in range(1, steps):
            s.record_groups(step, [make_group(k, MIXED if step % 3 else FAIL) for k in range(keys)])
            time.sleep(0.005)  # let the reader interleave
        kind, detail, _ = queue.get(timeout=60)
        reader.join(timeout=30)
    assert kind == "ok", detail
    assert detail[-1] == steps
    assert len(detail) > 2  # it really read while the writer wrote


def test_reader_thread_while_writing(tmp_path, make_group):
    path = tmp_path / "h.db"
    errors: list[BaseException] = []
    totals: list[int] = []
    with HistoryStore(path) as s:
        s.record_groups(0, [make_group(k, PASS) for k in range(50)])
        stop = threading.Event()

        def read() -> None:
            try:
                with HistoryStore(path, readonly=True) as r:
                    while not stop.is_set():
                        totals.append(sum(st.groups for st in r.prompt_stats(range(50)).values()))
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=read)
        t.start()
        for step in range(1, 40):
            s.record_groups(step, [make_group(k, MIXED) for k in range(50)])
        stop.set()
        t.join()
    assert not errors
    assert totals and all(x % 50 == 0 for x in totals)  # whole steps only
    assert totals == sorted(totals)  # never goes backwards


# --- bad input -----------------------------------------------------------------------------------


def _snapshot(s: HistoryStore) -> tuple[object, ...]:
    return (s.num_groups(), s.num_prompts(), s.latest_step(), s.prompt_stats(range(10)))


@pytest.mark.parametrize(
    ("record", "match"),
    [
        (GroupRecord(2, [[1.0, 0.0], [1.0, 0.0]], [1, 2]), r"'rewards' has shape \(2, 2\)"),
        (GroupRecord(2, [], []), r"'rewards' has shape \(0,\)"),
        (GroupRecord(2, [1.0, 0.0, 1.0], [1, 2]), r"'lengths' has shape \(2,\); expected \(3,\)"),
        (GroupRecord(2, [1.0, float("nan")], [1, 2]), r"'rewards' holds a non-finite value"),
        (GroupRecord(2, [1.0, float("inf")], [1, 2]), r"non-finite"),
        (GroupRecord(2, ["a", "b"], [1, 2]), r"'rewards' is not numeric"),
        (GroupRecord(2, [1.0, 0.0], [1.5, 2.0]), r"'lengths' has dtype float64"),
        (GroupRecord(2, [1.0, 0.0], [1, -2]), r"'lengths' holds a negative length"),
        (GroupRecord(2, [1.0, 0.0], [1, 2], ["stop", "eos"]), r"'finish_reasons\[1\]' is 'eos'"),
        (GroupRecord(2, [1.0, 0.0], [1, 2], ["stop"]), r"'finish_reasons' has 1 entries"),
        (GroupRecord(2, [1.0, 0.0], [1, 2], truncated=[1, 0]), r"'truncated' has dtype"),
        (GroupRecord(2, [1.0, 0.0], [1, 2], responses=[[1]]), r"'responses' has 1 entries"),
        (GroupRecord(2, [1.0, 0.0], [1, 2], responses=[[1], [-3]]), r"outside \[0, 2\*\*31\)"),
        (GroupRecord(2, [1.0, 0.0], [1, 2], prompt_length=-1), r"'prompt_length' is -1"),
        (GroupRecord(2, [1.0, 0.0], [1, 2], weight_version=1.5), r"'weight_version' has type"),
    ],
)
def test_malformed_groups_are_rejected_atomically(store, make_group, record, match):
    store.record_groups(0, [make_group(1, MIXED)])
    before = _snapshot(store)
    # The bad group comes after a good one: neither may be written.
    with pytest.raises(InvalidRecordError, match=match) as info:
        store.record_groups(1, [make_group(1, PASS), record])
    assert "groups[1] (prompt 2)" in str(info.value)
    assert _snapshot(store) == before


@pytest.mark.parametrize("key", [True, 1.5, None, -1, "", b"k", 2**63])
def test_invalid_prompt_keys(store, make_group, key):
    with pytest.raises(InvalidPromptKeyError, match="prompt key"):
        store.record_groups(0, [make_group(key, MIXED)])
    with pytest.raises(InvalidPromptKeyError):
        store.prompt_stats([key])
    assert store.num_groups() == 0


def test_unknown_prompt_keys_raise_where_history_is_needed(store, make_group):
    store.record_groups(0, [make_group(1, FAIL)])
    for call in (
        lambda: store.stats(42),
        lambda: store.group_history("nope"),
        lambda: store.responses(42),
        lambda: store.prompt_stats([1, 42], strict=True),
    ):
        with pytest.raises(UnknownPromptError, match="unknown prompt key") as info:
            call()
        assert isinstance(info.value, KeyError)
    with pytest.raises(UnknownPromptError, match="42"):
        store.record_skips(1, [1, 42])
    assert store.stats(1).skips_since_rollout == 0  # the known key was not touched either
    store.record_skips(1, [1])
    assert store.stats(1).skips_since_rollout == 1 and store.stats(1).last_skip_step == 1


def test_steps_must_not_go_backwards(store, make_group):
    store.record_groups(5, [make_group(1, MIXED)])
    with pytest.raises(InvalidRecordError, match="older than the latest recorded step 5"):
        store.record_groups(4, [make_group(1, FAIL)])
    for bad in (-1, 1.0, True):
        with pytest.raises(InvalidRecordError, match="step"):
            store.record_groups(bad, [make_group(1, FAIL)])
    assert store.stats(1).groups == 1


def test_corrupt_file_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "h.db"
    data = bytes(range(256)) * 64
    path.write_bytes(data)
    with pytest.raises(HistoryFormatError, match="corrupt or foreign"):
        HistoryStore(path)
    with pytest.raises(HistoryFormatError):
        HistoryStore(path, readonly=True)
    assert path.read_bytes() == data


def test_foreign_sqlite_database_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.execute("INSERT INTO users VALUES ('ada')")
    conn.commit()
    conn.close()
    data = path.read_bytes()
    with pytest.raises(HistoryFormatError, match="another application"):
        HistoryStore(path)
    assert path.read_bytes() == data


def test_newer_schema_is_refused_and_data_kept(tmp_path, make_group):
    path = tmp_path / "h.db"
    with HistoryStore(path) as s:
        s.record_groups(0, [make_group(1, MIXED)])
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(HistorySchemaError, match="version 99 is newer"):
        HistoryStore(path)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT COUNT(*) FROM groups").fetchone() == (1,)
    conn.close()


def test_truncated_database_reports_format_error(tmp_path, make_group):
    path = tmp_path / "h.db"
    with HistoryStore(path) as s:
        s.record_groups(0, [make_group(k, MIXED, [300] * 4) for k in range(3000)])
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 3)
    s = None
    with pytest.raises(HistoryFormatError, match="corrupt"):
        s = HistoryStore(path)
        s.prompt_stats(range(3000))
    if s is not None:
        s.close()


def test_readonly_store_refuses_writes(tmp_path, make_group):
    path = tmp_path / "h.db"
    with HistoryStore(path) as s:
        s.record_groups(0, [make_group(1, MIXED)])
    with HistoryStore(path, readonly=True) as r:
        with pytest.raises(ReadOnlyHistoryError):
            r.record_groups(1, [make_group(1, MIXED)])
        with pytest.raises(ReadOnlyHistoryError):
            r.load(0)
        assert r.stats(1).groups == 1
    with pytest.raises(HistoryFormatError, match="no history database"):
        HistoryStore(tmp_path / "missing.db", readonly=True)


def test_config_validation():
    with pytest.raises(InvalidConfigError, match="decay"):
        HistoryConfig(decay=0.0)
    with pytest.raises(InvalidConfigError, match="max_responses_per_prompt"):
        HistoryConfig(max_responses_per_prompt=-1)


def test_integrity_check_passes_on_a_healthy_file(store, make_group):
    store.record_groups(0, [make_group(1, MIXED)])
    store.check_integrity()
    assert Path(store.path).exists()
