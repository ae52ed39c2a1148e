"""Segment markings: the `segments` field of /generate and the separator convention."""

from __future__ import annotations

import pytest

from rollout_accel.serving.engine.errors import InvalidRequestError
from rollout_accel.serving.kvreuse.segments import (
    parse_segments,
    parse_segments_batch,
    split_on_separator,
)


def test_valid_segments_parse() -> None:
    assert parse_segments(None, 10) == []
    assert parse_segments([], 10) == []
    assert parse_segments([[0, 4], [4, 10]], 10) == [(0, 4), (4, 10)]
    assert parse_segments([[2, 3], [5, 9]], 10) == [(2, 3), (5, 9)]


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ({"a": 1}, "segments: expected a list"),
        ([[0, 4, 5]], r"segments\[0\]: expected a \[start, end\] pair"),
        ([[0, 4], 7], r"segments\[1\]: expected a \[start, end\] pair"),
        ([[0, "4"]], r"segments\[0\]: start and end must be integers"),
        ([[True, 4]], r"segments\[0\]: start and end must be integers"),
        ([[0, 4.0]], r"segments\[0\]: start and end must be integers"),
        ([[-1, 4]], r"segments\[0\]: \[-1, 4\) is outside the prompt's 10 tokens"),
        ([[0, 11]], r"segments\[0\]: \[0, 11\) is outside"),
        ([[3, 3]], r"segments\[0\]: end must be greater than start"),
        ([[0, 5], [4, 8]], r"segments\[1\]: segments must be ascending and non-overlapping"),
        ([[5, 8], [0, 2]], r"segments\[1\]: segments must be ascending"),
    ],
)
def test_bad_segments_name_the_field(value, needle) -> None:
    with pytest.raises(InvalidRequestError, match=needle):
        parse_segments(value, 10)


def test_batch_segments_one_list_per_prompt() -> None:
    assert parse_segments_batch(None, [3, 4]) == [[], []]
    assert parse_segments_batch([[[0, 2]], None], [3, 4]) == [[(0, 2)], []]
    with pytest.raises(InvalidRequestError, match="a batch of 2 prompts needs a list of 2"):
        parse_segments_batch([[0, 2]], [3, 4])
    with pytest.raises(InvalidRequestError, match=r"segments\[1\]\[0\]: \[0, 9\) is outside"):
        parse_segments_batch([[], [[0, 9]]], [3, 4])


def test_separator_splits_and_stays_a_prompt_token() -> None:
    ids = [1, 2, 9, 9, 3, 4, 5, 9, 9, 9, 9, 6]
    assert split_on_separator(ids, [9, 9]) == [(0, 2), (4, 7), (11, 12)]
    assert split_on_separator([9, 9], [9, 9]) == []
    assert split_on_separator([1, 2], [7]) == [(0, 2)]
    with pytest.raises(ValueError, match="separator"):
        split_on_separator([1], [])
