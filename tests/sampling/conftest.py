"""Shared fixtures: a real SQLite history in tmp_path, and a compact group builder."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from rollout_accel.sampling import GroupRecord, HistoryStore

MakeGroup = Callable[..., GroupRecord]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[HistoryStore]:
    with HistoryStore(tmp_path / "history.db") as s:
        yield s


@pytest.fixture
def make_group() -> MakeGroup:
    """group(key, rewards, lengths=None, **fields): lengths default to 100 tokens each."""

    def build(
        key: int | str,
        rewards: Sequence[float],
        lengths: Sequence[int] | None = None,
        **fields: object,
    ) -> GroupRecord:
        return GroupRecord(
            key=key,
            rewards=list(rewards),
            lengths=list(lengths) if lengths is not None else [100] * len(rewards),
            **fields,  # type: ignore[arg-type]
        )

    return build
