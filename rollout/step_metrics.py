"""Numbers of one rollout step: slime's metric names where slime has one, `accel/...` for ours."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from rollout_accel.rollout.pool.base import RequestSpan
from rollout_accel.rollout.sample_types import Sample, Status
from rollout_accel.sampling.rank_correlation import spearman

__all__ = ["occupancy", "sample_metrics", "spearman", "tail_metrics"]


def occupancy(spans: Sequence[RequestSpan], start: float, end: float) -> tuple[float, float]:
    """(time-mean, peak) of requests in flight over [start, end], from the spans."""
    if not spans or end <= start:
        return 0.0, 0.0
    events = sorted([(s.start, 1) for s in spans] + [(s.end, -1) for s in spans])
    level, area, peak, last = 0, 0.0, 0, start
    for t, delta in events:
        t = min(max(t, start), end)
        area += level * (t - last)
        last = t
        level += delta
        peak = max(peak, level)
    area += level * (end - last)
    return area / (end - start), float(peak)


def sample_metrics(groups: Sequence[Sequence[Sample]]) -> dict[str, float]:
    lengths = [s.response_length for g in groups for s in g]
    out: dict[str, float] = {}
    if lengths:
        out["rollout/response_len/mean"] = float(statistics.fmean(lengths))
        out["rollout/response_len/median"] = float(statistics.median(lengths))
        out["rollout/response_len/max"] = float(max(lengths))
        out["rollout/response_len/min"] = float(min(lengths))
        truncated = sum(1 for g in groups for s in g if s.status == Status.TRUNCATED)
        out["rollout/truncated_ratio"] = truncated / len(lengths)
    return out


def tail_metrics(spans: Sequence[RequestSpan], start: float, end: float) -> dict[str, float]:
    """Tail ratio (max / median request time) and idle share: 1 - mean/peak requests in flight,
    i.e. the share of the step's peak batch capacity left unused (it grows as a few stragglers
    hold the step open)."""
    out: dict[str, float] = {}
    durations = [s.end - s.start for s in spans if s.finish != "failed"]
    if durations:
        median = statistics.median(durations)
        out["accel/tail_ratio"] = max(durations) / median if median > 0 else float("nan")
    mean, peak = occupancy(spans, start, end)
    out["accel/idle_share"] = 1.0 - mean / peak if peak else 0.0
    return out
