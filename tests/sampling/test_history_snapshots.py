"""History snapshots on disk: a killed save leaves no temporary behind for good, old snapshots are
pruned, and each snapshot is fsynced before it replaces the old one (issue 20: 10). Real SQLite,
a real SIGKILLed child process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rollout_accel.sampling.errors import InvalidConfigError
from rollout_accel.sampling.history import HistoryConfig, HistoryStore

_SAVER = textwrap.dedent(
    """
    import sys
    from rollout_accel.sampling.history import HistoryStore

    store = HistoryStore(sys.argv[1])
    store.put_state("ballast", {"blob": "x" * 60_000_000})  # makes each save take a while
    print("ready", flush=True)
    for i in range(1000):
        store.save(i % 3, sys.argv[2])
    """
)


def _temporaries(directory: Path) -> list[Path]:
    return sorted(directory.glob("history_*.tmp"))


def test_a_killed_save_leaves_no_temporary_for_long(tmp_path) -> None:
    snapshots = tmp_path / "snapshots"
    snapshots.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(tmp_path / "h.db"), str(snapshots)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        deadline = time.time() + 60
        while not _temporaries(snapshots):  # kill it in the middle of a save
            assert time.time() < deadline and child.poll() is None
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()
    left = _temporaries(snapshots)
    assert left, "the kill did not land inside a save"
    assert str(child.pid) in left[0].name  # temporaries carry their writer's pid
    with HistoryStore(tmp_path / "h.db") as store:
        store.save(7, snapshots)
    assert _temporaries(snapshots) == []
    assert (snapshots / "history_7.db").is_file()


def test_a_temporary_of_a_live_writer_is_kept(tmp_path) -> None:
    live = tmp_path / f"history_1.db.{os.getppid()}.abcd.tmp"  # our parent is alive
    live.write_bytes(b"in progress")
    old = tmp_path / "history_2.dbq1w2e3.tmp"  # pre-pid naming, fresh: kept for now
    old.write_bytes(b"?")
    with HistoryStore(tmp_path / "h.db") as store:
        store.save(3, tmp_path)
    assert live.exists() and old.exists()
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    with HistoryStore(tmp_path / "h.db") as store:
        store.save(4, tmp_path)
    assert live.exists() and not old.exists()


def test_only_the_newest_snapshots_are_kept(tmp_path) -> None:
    with HistoryStore(tmp_path / "h.db", HistoryConfig(max_snapshots=3)) as store:
        for rollout_id in (1, 2, 10, 3, 11, 12):
            store.save(rollout_id, tmp_path / "s")
        names = sorted(p.name for p in (tmp_path / "s").iterdir())
        assert names == ["history_10.db", "history_11.db", "history_12.db"]
        store.load(11, tmp_path / "s")  # a kept snapshot still loads
    with HistoryStore(tmp_path / "h2.db", HistoryConfig(max_snapshots=0)) as store:
        for rollout_id in range(12):
            store.save(rollout_id, tmp_path / "all")
    assert len(list((tmp_path / "all").iterdir())) == 12
    with pytest.raises(InvalidConfigError, match="max_snapshots"):
        HistoryConfig(max_snapshots=-1)


def test_save_fsyncs_the_file_before_renaming_it(tmp_path, monkeypatch) -> None:
    """Records the order of fsync and rename calls (the OS calls still run)."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync:" + os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(f"replace:{dst}")
        real_replace(src, dst)

    with HistoryStore(tmp_path / "h.db") as store:
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        target = store.save(5, tmp_path / "s")
    kinds = [e.split(":", 1)[0] for e in events]
    assert kinds == ["fsync", "replace", "fsync"]
    assert events[0].endswith(".tmp") and events[2] == f"fsync:{target.parent}"
