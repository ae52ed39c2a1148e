"""Persistent per-prompt rollout history in one SQLite file (WAL: one writer, many readers).

Layout (schema version 1, `PRAGMA application_id` = 'RAHS'):

- `prompts`: one summary row per prompt key, updated in the same transaction that appends the raw
  groups. Policies read only these rows, so scoring a candidate costs one indexed lookup however
  long the history grows (1M prompts x 100 steps stays an index probe per key).
- `groups`: every recorded group, raw: rewards, lengths, finish reasons, truncation, weight
  version. Never rewritten; kept for audits and for rebuilding summaries.
- `responses`: the latest `max_responses_per_prompt` responses' token ids per prompt, in a ring of
  slots (O(1) per insert, bounded per prompt): the corpus the draft index proposes from.
- `meta`: the global priors (pass rate, length distribution, prompt-length regression), the latest
  recorded step and named policy states (the selector's exploration rates), as JSON.

The controller records one step in one call (`record_groups`), which is one transaction: a reader
sees either all of a step or none of it. Bad input is rejected before anything is written.
`save(rollout_id)` / `load(rollout_id)` snapshot and restore the whole file, next to slime's own
`rollout/global_dataset_state_dict_<rollout_id>.pt`.

A `HistoryStore` object belongs to the thread that made it (sqlite3's rule); open one per thread
or process. Open readers with `readonly=True`.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import (
    CheckpointNotFoundError,
    HistoryFormatError,
    HistorySchemaError,
    InvalidArgumentError,
    InvalidConfigError,
    InvalidRecordError,
    ReadOnlyHistoryError,
    UnknownPromptError,
)
from .records import (
    FINISH_REASONS,
    CheckedGroup,
    GroupOutcome,
    GroupRecord,
    PromptKey,
    PromptStats,
    check_group,
    check_prompt_key,
    log_length,
)

SCHEMA_VERSION = 1
APPLICATION_ID = 0x52414853  # "RAHS": rollout-accel history store
_CHUNK = 900  # keys per IN (...) query: well under SQLite's bound-variable limit
_TABLES = ("prompts", "groups", "responses", "meta")

_SCHEMA = """
CREATE TABLE prompts (
    id INTEGER NOT NULL UNIQUE,   -- compact reference for groups and responses
    key NOT NULL PRIMARY KEY,     -- no type: int keys stay ints, str keys stay text
    prompt_length INTEGER,
    first_step INTEGER NOT NULL,
    last_step INTEGER NOT NULL,
    groups INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    zero_var_streak INTEGER NOT NULL,
    last_outcome INTEGER NOT NULL,
    zero_var_groups INTEGER NOT NULL,
    pass_s REAL NOT NULL,
    pass_n REAL NOT NULL,
    len_w REAL NOT NULL,
    len_s REAL NOT NULL,
    len_ss REAL NOT NULL,
    tok_s REAL NOT NULL,
    trunc_s REAL NOT NULL,
    skips INTEGER NOT NULL,
    last_skip_step INTEGER,
    weight_version TEXT,
    resp_count INTEGER NOT NULL
) WITHOUT ROWID;                  -- clustered on key: one B-tree descent per candidate
CREATE TABLE groups (
    id INTEGER PRIMARY KEY,
    prompt_id INTEGER NOT NULL,
    step INTEGER NOT NULL,
    weight_version TEXT,
    rewards BLOB NOT NULL,        -- float64 little-endian
    lengths BLOB NOT NULL,        -- int32
    finish BLOB NOT NULL,         -- uint8 index into FINISH_REASONS
    truncated BLOB NOT NULL       -- uint8 0/1
);
CREATE INDEX groups_by_prompt ON groups (prompt_id, step);
CREATE TABLE responses (
    prompt_id INTEGER NOT NULL,
    slot INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    step INTEGER NOT NULL,
    tokens BLOB NOT NULL,         -- int32
    PRIMARY KEY (prompt_id, slot)
) WITHOUT ROWID;
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# Column order of `prompts` as read and written below.
_COLS = (
    "id, key, prompt_length, first_step, last_step, groups, samples, zero_var_streak, "
    "last_outcome, zero_var_groups, pass_s, pass_n, len_w, len_s, len_ss, tok_s, trunc_s, "
    "skips, last_skip_step, weight_version, resp_count"
)
_N_COLS = 21
_OUTCOMES = tuple(GroupOutcome)  # GroupOutcome by stored int, without an enum call per row

# PromptStats, field for field; the derived means are computed by SQLite, in C, because this
# runs for every candidate of every step.
_STATS_SQL = """SELECT key, groups, samples, first_step, last_step, zero_var_streak, last_outcome,
    zero_var_groups, pass_s, pass_n, len_w,
    CASE WHEN len_w > 0 THEN len_s / len_w ELSE 0.0 END,
    CASE WHEN len_w > 0 THEN MAX(len_ss / len_w - (len_s / len_w) * (len_s / len_w), 0.0)
        ELSE 0.0 END,
    CASE WHEN len_w > 0 THEN tok_s / len_w ELSE 0.0 END,
    CASE WHEN len_w > 0 THEN trunc_s / len_w ELSE 0.0 END,
    prompt_length, skips, last_skip_step, weight_version, resp_count
FROM prompts"""


@dataclass(frozen=True, slots=True)
class HistoryConfig:
    """How the store summarises history.

    decay: weight kept by older evidence each time a prompt gets a new group (pass counts, length
      moments). 0.7 keeps ~3 groups of memory: pass rates drift during training.
    pass_threshold: a sample passes when reward >= this (0/1 and -1/+1 rewards both work at 0.5).
    prior_decay: weight kept by the global priors per recorded step.
    max_responses_per_prompt / max_response_tokens: bound the draft corpus per prompt.
    busy_timeout_s: how long a call waits for another connection's lock.
    max_snapshots: `save` keeps this many newest snapshots per directory (by rollout id) and
      deletes older ones; 0 keeps all.
    """

    decay: float = 0.7
    pass_threshold: float = 0.5
    prior_decay: float = 0.98
    max_responses_per_prompt: int = 16
    max_response_tokens: int = 8192
    busy_timeout_s: float = 30.0
    max_snapshots: int = 8

    def __post_init__(self) -> None:
        if not 0.0 < self.decay <= 1.0:
            raise InvalidConfigError(f"HistoryConfig.decay={self.decay} must be in (0, 1]")
        if not 0.0 < self.prior_decay <= 1.0:
            raise InvalidConfigError(
                f"HistoryConfig.prior_decay={self.prior_decay} must be in (0, 1]"
            )
        if not math.isfinite(self.pass_threshold):
            raise InvalidConfigError("HistoryConfig.pass_threshold must be finite")
        if self.max_snapshots < 0:
            raise InvalidConfigError("HistoryConfig.max_snapshots must be >= 0 (0 keeps all)")
        if self.max_responses_per_prompt < 0 or self.max_response_tokens < 1:
            raise InvalidConfigError(
                "HistoryConfig.max_responses_per_prompt must be >= 0 and max_response_tokens >= 1"
            )


@dataclass(frozen=True, slots=True)
class GroupHistoryEntry:
    """One raw recorded group, as `HistoryStore.group_history` returns it."""

    step: int
    rewards: tuple[float, ...]
    lengths: tuple[int, ...]
    finish_reasons: tuple[str, ...]
    truncated: tuple[bool, ...]
    weight_version: str | None


@dataclass(frozen=True, slots=True)
class GlobalStats:
    """Dataset-wide priors, discounted by `prior_decay` per recorded step.

    Used for prompts without history: the pass-rate prior of the allocator and the cold-start
    length prior (a regression of a group's mean log length on log prompt length).
    """

    pass_s: float = 0.0
    pass_n: float = 0.0
    len_w: float = 0.0  # samples
    len_s: float = 0.0  # sum of log lengths
    len_ss: float = 0.0
    within_ss: float = 0.0  # sum of squared deviations from the group mean (log lengths)
    within_df: float = 0.0
    reg_w: float = 0.0  # groups with a known prompt length
    reg_x: float = 0.0
    reg_y: float = 0.0
    reg_xx: float = 0.0
    reg_xy: float = 0.0
    reg_yy: float = 0.0
    groups: int = 0
    samples: int = 0
    tokens: int = 0

    @property
    def pass_rate(self) -> float:
        """Global pass rate, 0.5 before any data."""
        return (self.pass_s + 1.0) / (self.pass_n + 2.0)

    @property
    def log_length_mean(self) -> float | None:
        return self.len_s / self.len_w if self.len_w > 0 else None

    @property
    def log_length_var(self) -> float | None:
        if self.len_w <= 1:
            return None
        mean = self.len_s / self.len_w
        return max(self.len_ss / self.len_w - mean * mean, 0.0)

    @property
    def within_var(self) -> float | None:
        """Pooled within-group variance of log length (sampling noise of one response)."""
        return self.within_ss / self.within_df if self.within_df > 0 else None

    def regression(self) -> tuple[float, float, float, float] | None:
        """(mean x, mean y, slope, residual variance) of the least-squares fit of a group's mean
        log length (y) on log(prompt length + 1) (x); None before 3 groups with prompt lengths."""
        if self.reg_w < 3:
            return None
        mx, my = self.reg_x / self.reg_w, self.reg_y / self.reg_w
        sxx = self.reg_xx / self.reg_w - mx * mx
        sxy = self.reg_xy / self.reg_w - mx * my
        syy = max(self.reg_yy / self.reg_w - my * my, 0.0)
        slope = sxy / sxx if sxx > 1e-9 else 0.0
        return mx, my, slope, max(syy - slope * sxy, 0.0)


class HistoryStore:
    """The per-prompt rollout history; see the module docstring for layout and guarantees."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        config: HistoryConfig | None = None,
        *,
        readonly: bool = False,
    ) -> None:
        self.path = Path(path)
        self.config = config or HistoryConfig()
        self.readonly = readonly
        self._conn = _open(self.path, readonly, self.config.busy_timeout_s)

    # --- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "ro" if self.readonly else "rw"
        return f"HistoryStore({str(self.path)!r}, {mode})"

    # --- writing -------------------------------------------------------------------------------

    def record_groups(self, step: int, groups: Sequence[GroupRecord]) -> list[GroupOutcome]:
        """Append one step's finished groups and update each prompt's summary, atomically.

        Returns each group's outcome (MIXED, ALL_PASS, ALL_FAIL, EMPTY), in input order.

        Raises InvalidRecordError / InvalidPromptKeyError before writing anything if any record
        is malformed, or if `step` is older than the latest recorded step.
        """
        self._writable()
        step = _check_step(step)
        checked = [check_group(g, i) for i, g in enumerate(groups)]
        cfg = self.config
        with self._write() as cur:
            latest = self._meta_get(cur, "latest_step")
            if latest is not None and step < latest:
                raise InvalidRecordError(
                    f"step {step} is older than the latest recorded step {latest}; steps must "
                    "not go backwards (use load(rollout_id) to rewind)"
                )
            rows = self._rows(cur, {g.key for g in checked})
            next_id = cur.execute("SELECT COALESCE(MAX(id), 0) FROM prompts").fetchone()[0] + 1
            new_ids: set[int] = set()
            sums = _StepSums.of(checked, cfg.pass_threshold)
            group_rows = []
            response_rows = []
            for i, g in enumerate(checked):
                row = rows.get(g.key)
                if row is None:
                    row = _new_row(next_id, g.key, step)
                    new_ids.add(next_id)
                    next_id += 1
                    rows[g.key] = row
                _update_row(row, g, sums, i, step, cfg.decay)
                group_rows.append(
                    (
                        row[0],
                        step,
                        g.weight_version,
                        g.rewards.astype("<f8").tobytes(),
                        g.lengths.astype("<i4").tobytes(),
                        g.finish.tobytes(),
                        g.truncated.astype(np.uint8).tobytes(),
                    )
                )
                if g.responses and cfg.max_responses_per_prompt > 0:
                    cap = cfg.max_responses_per_prompt
                    for tokens in g.responses:
                        seq = row[20]
                        response_rows.append(
                            (
                                row[0],
                                seq % cap,
                                seq,
                                step,
                                tokens[: cfg.max_response_tokens].astype("<i4").tobytes(),
                            )
                        )
                        row[20] = seq + 1
            touched = {g.key for g in checked}
            inserts = [tuple(rows[k]) for k in touched if rows[k][0] in new_ids]
            updates = [(*rows[k][2:], k) for k in touched if rows[k][0] not in new_ids]
            placeholders = ", ".join("?" * _N_COLS)
            cur.executemany(f"INSERT INTO prompts ({_COLS}) VALUES ({placeholders})", inserts)
            sets = ", ".join(f"{c.strip()} = ?" for c in _COLS.split(",")[2:])
            cur.executemany(f"UPDATE prompts SET {sets} WHERE key = ?", updates)
            cur.executemany(
                "INSERT INTO groups (prompt_id, step, weight_version, rewards, lengths, finish, "
                "truncated) VALUES (?, ?, ?, ?, ?, ?, ?)",
                group_rows,
            )
            cur.executemany(
                "INSERT OR REPLACE INTO responses (prompt_id, slot, seq, step, tokens) "
                "VALUES (?, ?, ?, ?, ?)",
                response_rows,
            )
            glob = _fold_global(self._global(cur), checked, sums, cfg.prior_decay)
            self._meta_put(cur, "global", glob)
            self._meta_put(cur, "latest_step", step)
        return [GroupOutcome(int(o)) for o in sums.outcome]

    def record_skips(self, step: int, keys: Iterable[PromptKey]) -> None:
        """Note that the selector skipped these prompts at `step` (feeds the starvation guard).

        Raises UnknownPromptError if a key has no history: only known prompts can be skipped.
        """
        self._writable()
        step = _check_step(step)
        keys = list(dict.fromkeys(check_prompt_key(k) for k in keys))
        with self._write() as cur:
            rows = self._rows(cur, set(keys))
            missing = [k for k in keys if k not in rows]
            if missing:
                raise UnknownPromptError(_unknown_message(missing, "cannot record a skip"))
            cur.executemany(
                "UPDATE prompts SET skips = skips + 1, last_skip_step = ? WHERE key = ?",
                [(step, k) for k in keys],
            )

    def put_state(self, name: str, value: dict[str, object]) -> None:
        """Persist a policy's small JSON state (saved and restored with the history)."""
        self._writable()
        with self._write() as cur:
            self._meta_put(cur, f"state:{name}", value)

    # --- reading -------------------------------------------------------------------------------

    def prompt_stats(
        self, keys: Iterable[PromptKey], *, strict: bool = False
    ) -> dict[PromptKey, PromptStats]:
        """Summaries of the given prompts, read in one snapshot.

        Prompts without history are absent from the result (new prompts are normal), unless
        `strict`, where any unknown key raises UnknownPromptError.
        """
        wanted = list(dict.fromkeys(check_prompt_key(k) for k in keys))
        found: dict[PromptKey, PromptStats] = {}
        with self._read() as cur:
            for i in range(0, len(wanted), _CHUNK):
                chunk = wanted[i : i + _CHUNK]
                marks = ", ".join("?" * len(chunk))
                for r in cur.execute(f"{_STATS_SQL} WHERE key IN ({marks})", chunk):
                    found[r[0]] = PromptStats._make((*r[:6], _OUTCOMES[r[6]], *r[7:]))
        if strict:
            missing = [k for k in wanted if k not in found]
            if missing:
                raise UnknownPromptError(_unknown_message(missing, "no history"))
        return {k: found[k] for k in wanted if k in found}

    def stats(self, key: PromptKey) -> PromptStats:
        """One prompt's summary; UnknownPromptError if it has no history."""
        return self.prompt_stats([key], strict=True)[check_prompt_key(key)]

    def group_history(self, key: PromptKey, last: int | None = None) -> list[GroupHistoryEntry]:
        """The raw recorded groups of one prompt, oldest first (the `last` ones if given)."""
        key = check_prompt_key(key)
        with self._read() as cur:
            pid = self._prompt_id(cur, key)
            sql = (
                "SELECT step, weight_version, rewards, lengths, finish, truncated FROM groups "
                "WHERE prompt_id = ? ORDER BY step DESC, id DESC"
            )
            params: tuple[object, ...] = (pid,)
            if last is not None:
                sql += " LIMIT ?"
                params = (pid, int(last))
            found = cur.execute(sql, params).fetchall()
        return [
            GroupHistoryEntry(
                step=step,
                rewards=tuple(np.frombuffer(rw, dtype="<f8").tolist()),
                lengths=tuple(np.frombuffer(ln, dtype="<i4").tolist()),
                finish_reasons=tuple(FINISH_REASONS[c] for c in fin),
                truncated=tuple(bool(t) for t in tr),
                weight_version=wv,
            )
            for step, wv, rw, ln, fin, tr in reversed(found)
        ]

    def responses(self, key: PromptKey) -> list[np.ndarray]:
        """Stored response token ids of one prompt (int32), oldest first; [] if none stored.

        Raises UnknownPromptError if the prompt has no history.
        """
        key = check_prompt_key(key)
        with self._read() as cur:
            pid = self._prompt_id(cur, key)
            found = cur.execute(
                "SELECT tokens FROM responses WHERE prompt_id = ? ORDER BY seq", (pid,)
            ).fetchall()
        return [np.frombuffer(t, dtype="<i4") for (t,) in found]

    def keys_with_responses(self, limit: int | None = None) -> list[PromptKey]:
        """Prompt keys that have stored responses, most recently rolled out first."""
        sql = "SELECT key FROM prompts WHERE resp_count > 0 ORDER BY last_step DESC, id DESC" + (
            " LIMIT ?" if limit is not None else ""
        )
        with self._read() as cur:
            found = cur.execute(sql, () if limit is None else (int(limit),)).fetchall()
        return [k for (k,) in found]

    def global_stats(self) -> GlobalStats:
        with self._read() as cur:
            return self._global(cur)

    def get_state(self, name: str) -> dict[str, object] | None:
        with self._read() as cur:
            value = self._meta_get(cur, f"state:{name}")
        return value if isinstance(value, dict) else None

    def latest_step(self) -> int | None:
        """The newest step recorded, or None for an empty history."""
        with self._read() as cur:
            value = self._meta_get(cur, "latest_step")
        return None if value is None else int(value)

    def num_prompts(self) -> int:
        with self._read() as cur:
            return int(cur.execute("SELECT COUNT(*) FROM prompts").fetchone()[0])

    def num_groups(self) -> int:
        with self._read() as cur:
            return int(cur.execute("SELECT COUNT(*) FROM groups").fetchone()[0])

    # --- checkpoints ---------------------------------------------------------------------------

    def checkpoint_path(self, rollout_id: int, directory: str | os.PathLike[str] | None) -> Path:
        """Where `save(rollout_id, directory)` writes: `<directory>/history_<rollout_id>.db`.

        The default directory is `<history file>.checkpoints/`; slime users pass
        `<args.save>/rollout` to keep it beside slime's data-source state.
        """
        if isinstance(rollout_id, bool) or not isinstance(rollout_id, int) or rollout_id < 0:
            raise InvalidArgumentError(f"rollout_id {rollout_id!r} must be an int >= 0")
        base = Path(directory) if directory is not None else Path(f"{self.path}.checkpoints")
        return base / f"history_{rollout_id}.db"

    def save(self, rollout_id: int, directory: str | os.PathLike[str] | None = None) -> Path:
        """Snapshot the whole history (consistent, online) for `rollout_id`; returns the file.

        Written to a temporary file, fsynced and renamed (the directory fsynced too), so a crash
        never leaves a half snapshot. Temporary files of saves that died (their process is gone)
        are deleted first, and only the newest `config.max_snapshots` snapshots are kept.
        """
        target = self.checkpoint_path(rollout_id, directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target.parent)
        fd, tmp = tempfile.mkstemp(
            prefix=f"{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent
        )
        os.close(fd)
        try:
            dest = sqlite3.connect(tmp)
            try:
                with _db_errors(self.path):
                    self._conn.backup(dest)
                # A snapshot is a single self-contained file, not a WAL pair.
                dest.execute("PRAGMA journal_mode = DELETE")
            finally:
                dest.close()
            _fsync_path(tmp)
            os.replace(tmp, target)
            _fsync_path(target.parent)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if self.config.max_snapshots:
            prune_snapshots(target.parent, self.config.max_snapshots)
        return target

    def load(self, rollout_id: int, directory: str | os.PathLike[str] | None = None) -> None:
        """Replace the live history with the snapshot saved for `rollout_id` (resume).

        The snapshot is validated first: a missing, corrupt, foreign or newer-schema snapshot
        raises and leaves the live history unchanged.
        """
        self._writable()
        source = self.checkpoint_path(rollout_id, directory)
        if not source.is_file():
            raise CheckpointNotFoundError(
                f"no history snapshot for rollout_id {rollout_id} at {source}"
            )
        src = _open(source, readonly=True, timeout=self.config.busy_timeout_s)
        try:
            with _db_errors(source):
                src.execute("PRAGMA quick_check").fetchall()
                src.backup(self._conn)
        finally:
            src.close()
        with _db_errors(self.path):
            self._conn.execute("PRAGMA journal_mode = WAL")

    def check_integrity(self) -> None:
        """Full integrity check (reads every page); raises HistoryFormatError on corruption."""
        with self._read() as cur:
            result = cur.execute("PRAGMA integrity_check").fetchall()
        if result != [("ok",)]:
            raise HistoryFormatError(f"{self.path}: integrity check failed: {result[:3]}")

    # --- internals -----------------------------------------------------------------------------

    def _writable(self) -> None:
        if self.readonly:
            raise ReadOnlyHistoryError(f"{self.path} was opened read-only")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Cursor]:
        with _db_errors(self.path):
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Cursor]:
        # An explicit read transaction: every query inside sees the same snapshot.
        with _db_errors(self.path):
            cur = self._conn.cursor()
            cur.execute("BEGIN")
            try:
                yield cur
            finally:
                cur.execute("COMMIT")

    def _rows(self, cur: sqlite3.Cursor, keys: set[PromptKey]) -> dict[PromptKey, list[object]]:
        out: dict[PromptKey, list[object]] = {}
        ordered = list(keys)
        for i in range(0, len(ordered), _CHUNK):
            chunk = ordered[i : i + _CHUNK]
            marks = ", ".join("?" * len(chunk))
            for row in cur.execute(f"SELECT {_COLS} FROM prompts WHERE key IN ({marks})", chunk):
                out[row[1]] = list(row)
        return out

    def _prompt_id(self, cur: sqlite3.Cursor, key: PromptKey) -> int:
        found = cur.execute("SELECT id FROM prompts WHERE key = ?", (key,)).fetchone()
        if found is None:
            raise UnknownPromptError(_unknown_message([key], "no history"))
        return int(found[0])

    def _global(self, cur: sqlite3.Cursor) -> GlobalStats:
        value = self._meta_get(cur, "global")
        if not isinstance(value, dict):
            return GlobalStats()
        fields = GlobalStats.__dataclass_fields__
        return GlobalStats(**{k: v for k, v in value.items() if k in fields})

    @staticmethod
    def _meta_get(cur: sqlite3.Cursor, name: str) -> object:
        found = cur.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if found is None else json.loads(found[0])

    @staticmethod
    def _meta_put(cur: sqlite3.Cursor, name: str, value: object) -> None:
        cur.execute(
            "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, json.dumps(value))
        )


# --- summary arithmetic ------------------------------------------------------------------------


def _new_row(pid: int, key: PromptKey, step: int) -> list[object]:
    # Column order of _COLS: ids, steps and counts, seven discounted sums, skips, version, ring.
    head = [pid, key, None, step, step, 0, 0, 0, int(GroupOutcome.EMPTY), 0]
    return [*head, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, None, None, 0]


@dataclass(slots=True)
class _StepSums:
    """Per-group sums of one recorded step, computed in a few vectorised passes.

    Only non-aborted samples count, except in `samples` and `tokens`.
    """

    samples: np.ndarray
    tokens: np.ndarray
    valid: np.ndarray
    passed: np.ndarray
    log_sum: np.ndarray
    log_sq: np.ndarray
    tok_valid: np.ndarray
    truncated: np.ndarray
    outcome: np.ndarray  # GroupOutcome per group

    @classmethod
    def of(cls, groups: Sequence[CheckedGroup], pass_threshold: float) -> _StepSums:
        sizes = np.array([g.rewards.size for g in groups], dtype=np.int64)
        gid = np.repeat(np.arange(len(groups)), sizes)
        rewards = np.concatenate([g.rewards for g in groups]) if groups else np.zeros(0)
        lengths = np.concatenate([g.lengths for g in groups]) if groups else np.zeros(0, int)
        valid = np.concatenate([g.valid for g in groups]) if groups else np.zeros(0, bool)
        trunc = np.concatenate([g.truncated for g in groups]) if groups else np.zeros(0, bool)
        k = len(groups)
        vg, vr, vl = gid[valid], rewards[valid], lengths[valid]
        logs = log_length(vl)
        count = np.bincount(vg, minlength=k)
        outcome = np.full(k, int(GroupOutcome.EMPTY), dtype=np.int64)
        if vr.size:
            # reduceat over non-empty groups only: their starts are strictly increasing.
            nonempty = count > 0
            idx = (np.cumsum(count) - count)[nonempty]
            spread = np.maximum.reduceat(vr, idx) - np.minimum.reduceat(vr, idx)
            kind = np.where(
                vr[idx] >= pass_threshold, int(GroupOutcome.ALL_PASS), int(GroupOutcome.ALL_FAIL)
            )
            outcome[nonempty] = np.where(spread > 1e-9, int(GroupOutcome.MIXED), kind)
        return cls(
            samples=sizes,
            tokens=np.bincount(gid, weights=lengths, minlength=k),
            valid=count,
            passed=np.bincount(vg, weights=(vr >= pass_threshold), minlength=k),
            log_sum=np.bincount(vg, weights=logs, minlength=k),
            log_sq=np.bincount(vg, weights=logs * logs, minlength=k),
            tok_valid=np.bincount(vg, weights=vl, minlength=k),
            truncated=np.bincount(vg, weights=trunc[valid], minlength=k),
            outcome=outcome,
        )


def _update_row(
    row: list[object], g: CheckedGroup, s: _StepSums, i: int, step: int, decay: float
) -> None:
    """Fold group `i` of the step into a prompt's summary row (the column order of `_COLS`)."""
    if g.prompt_length is not None:
        row[2] = g.prompt_length
    row[4] = step
    row[5] += 1
    row[6] += int(s.samples[i])
    outcome = GroupOutcome(int(s.outcome[i]))
    if outcome is not GroupOutcome.EMPTY:
        # An all-aborted group says nothing about the prompt: leave streak and estimates alone.
        zero = outcome.zero_variance
        m = float(s.valid[i])
        row[7] = row[7] + 1 if zero else 0
        row[8] = int(outcome)
        row[9] += int(zero)
        row[10] = decay * row[10] + float(s.passed[i])
        row[11] = decay * row[11] + m
        row[12] = decay * row[12] + m
        row[13] = decay * row[13] + float(s.log_sum[i])
        row[14] = decay * row[14] + float(s.log_sq[i])
        row[15] = decay * row[15] + float(s.tok_valid[i])
        row[16] = decay * row[16] + float(s.truncated[i])
    row[17] = 0  # a rollout resets the starvation guard's skip count
    if g.weight_version is not None:
        row[19] = g.weight_version


def _fold_global(
    prev: GlobalStats, groups: Sequence[CheckedGroup], s: _StepSums, decay: float
) -> dict[str, float]:
    """Decay the global priors once per recorded step, then add the step's groups."""
    v = {k: getattr(prev, k) for k in GlobalStats.__dataclass_fields__}
    for k in v:
        if k not in ("groups", "samples", "tokens"):
            v[k] *= decay
    v["groups"] += len(groups)
    v["samples"] += int(s.samples.sum())
    v["tokens"] += int(s.tokens.sum())
    has = s.valid > 0
    m = s.valid[has].astype(np.float64)
    mean = s.log_sum[has] / m
    v["pass_s"] += float(s.passed.sum())
    v["pass_n"] += float(m.sum())
    v["len_w"] += float(m.sum())
    v["len_s"] += float(s.log_sum.sum())
    v["len_ss"] += float(s.log_sq.sum())
    v["within_ss"] += float(np.maximum(s.log_sq[has] - m * mean * mean, 0.0).sum())
    v["within_df"] += float((m - 1).sum())
    plen = np.array(
        [np.nan if g.prompt_length is None else g.prompt_length for g in groups], dtype=np.float64
    )[has]
    known = ~np.isnan(plen)
    x, y = np.log(plen[known] + 1.0), mean[known]
    v["reg_w"] += float(known.sum())
    v["reg_x"] += float(x.sum())
    v["reg_y"] += float(y.sum())
    v["reg_xx"] += float((x * x).sum())
    v["reg_xy"] += float((x * y).sum())
    v["reg_yy"] += float((y * y).sum())
    return v


# --- opening and validating files ------------------------------------------------------------


def _check_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise InvalidRecordError(f"step {step!r} must be an int >= 0")
    return int(step)


def _unknown_message(keys: list[PromptKey], what: str) -> str:
    shown = ", ".join(repr(k) for k in keys[:5])
    more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
    return f"{what}: unknown prompt key(s) {shown}{more}"


@contextmanager
def _db_errors(path: Path) -> Iterator[None]:
    """Report corruption as HistoryFormatError; lock timeouts and the like pass through."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        text = str(exc).lower()
        corrupt = ("not a database", "malformed", "corrupt", "encrypted", "no such table")
        if isinstance(exc, sqlite3.OperationalError) and not any(w in text for w in corrupt):
            raise
        raise HistoryFormatError(f"{path}: corrupt or foreign history database: {exc}") from exc


def _open(path: Path, readonly: bool, timeout: float) -> sqlite3.Connection:
    """Connect, then check the file is ours and not newer, before changing anything in it."""
    if readonly:
        if not path.is_file():
            raise HistoryFormatError(f"{path}: no history database to open read-only")
        conn = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=timeout, isolation_level=None
        )
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    try:
        with _db_errors(path):
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            if app_id == 0 and version == 0 and not tables:
                if readonly:
                    raise HistoryFormatError(f"{path}: empty file, not a history database")
                _create(conn)
                return conn
            if app_id != APPLICATION_ID:
                raise HistoryFormatError(
                    f"{path}: SQLite file of another application (application_id={app_id:#x}, "
                    f"expected {APPLICATION_ID:#x}); refusing to use it as a history"
                )
            if version > SCHEMA_VERSION:
                raise HistorySchemaError(
                    f"{path}: history schema version {version} is newer than this library's "
                    f"{SCHEMA_VERSION}; upgrade rollout-accel to read it"
                )
            if version < 1:
                raise HistoryFormatError(f"{path}: history schema version {version} is invalid")
            missing = [t for t in _TABLES if t not in tables]
            if missing:
                raise HistoryFormatError(f"{path}: history database lacks table(s) {missing}")
            if not readonly:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
    except BaseException:
        conn.close()
        raise
    return conn


def _create(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("BEGIN IMMEDIATE")
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    conn.execute("COMMIT")


# --- snapshot files -----------------------------------------------------------------------------

_SNAPSHOT_PREFIX, _SNAPSHOT_SUFFIX = "history_", ".db"
# A temporary file without a parsable writer pid (older versions) is stale after this long.
_ORPHAN_AGE_S = 3600.0


def _fsync_path(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Deletes `history_*.db.*.tmp` files whose writing process is gone; returns them.

    A save names its temporary `history_<id>.db.<pid>.<random>.tmp`; one whose pid is not running
    was killed mid-save. Our own pid's files are in-progress saves of this process (kept), and
    files without a pid are removed once older than an hour."""
    removed: list[Path] = []
    for path in Path(directory).glob(f"{_SNAPSHOT_PREFIX}*{_SNAPSHOT_SUFFIX}*.tmp"):
        parts = path.name.split(".")
        pid = int(parts[2]) if len(parts) >= 5 and parts[2].isdigit() else None
        try:
            if pid is None:
                stale = time.time() - path.stat().st_mtime > _ORPHAN_AGE_S
            else:
                stale = pid != os.getpid() and not _pid_alive(pid)
            if stale:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:  # another process cleaned it first
            continue
    return removed


def prune_snapshots(directory: str | os.PathLike[str], keep: int) -> list[Path]:
    """Deletes all but the `keep` newest (highest rollout id) snapshots in `directory`."""
    found: list[tuple[int, Path]] = []
    for path in Path(directory).glob(f"{_SNAPSHOT_PREFIX}*{_SNAPSHOT_SUFFIX}"):
        middle = path.name[len(_SNAPSHOT_PREFIX) : -len(_SNAPSHOT_SUFFIX)]
        if middle.isdigit():
            found.append((int(middle), path))
    found.sort()
    doomed = [path for _, path in found[: max(len(found) - keep, 0)]]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed
