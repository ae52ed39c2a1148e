"""Which split to run a mixed step with: a latency model profiled at start-up, and the choice.

The model (`LatencyModel`) is fitted per configuration — every preset split and the whole GPU
(`WHOLE`) — from timed runs (`LatencyTable`):
  decode step  t = a + b * batch + c * context_tokens   (KV read grows with the context)
  prefill      t = a + b * tokens + c * tokens^2          (attention is quadratic in the chunk)
Coefficients are least-squares fits clipped at zero, so a prediction never falls as work grows.

A mixed step (decode rows + a prefill chunk) is joined: the scheduler processes it once, so the
decode rows see the whole step as their time per output token. Options per step:
  * whole GPU: the decode graph, then the prefill-chunk graph, on the whole GPU; predicted
    decode_whole + prefill_whole;
  * preset p: decode on p's decode partition and prefill on its prefill partition at once;
    predicted max(decode_p, prefill_p) + the measured switch overhead.
Each option's prediction is scaled by a correction factor learnt online from served steps
(`observe`: measured / predicted, moving average), since the profile times each side alone and
a co-run also shares memory bandwidth and L2. A preset not yet measured borrows the mean factor
of the measured presets: co-run contention is much alike across splits (1.42-1.59 on an H200),
and starting every unmeasured preset at 1.0 made the planner walk through all of them, each
looking best until it was tried. The planner picks the fastest option (the same
tokens are computed either way, so the fastest
step is the highest throughput) among those whose predicted step time keeps under the TPOT bound;
when none does, the fastest overall (counted as a bound miss). Since the step is joined, the
bound cannot change which option is fastest; what it governs is how much prefill fits beside a
decode batch (`prefill_budget`, for a scheduler's token budget). A step with only decode or only
prefill work runs as today: there is nothing to run beside it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

WHOLE = -1  # the whole GPU (no partition): both parts one after the other
WHOLE_NAME = "whole"


@dataclass
class LatencyTable:
    """Timed runs by configuration (preset index, or WHOLE): decode points (batch, context
    tokens, seconds) and prefill points (tokens, seconds); `names` labels presets for logs."""

    decode: dict[int, list[tuple[int, int, float]]] = field(default_factory=dict)
    prefill: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
    switch_overhead_s: float = 0.0
    names: dict[int, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "decode": {str(k): v for k, v in self.decode.items()},
            "prefill": {str(k): v for k, v in self.prefill.items()},
            "switch_overhead_s": self.switch_overhead_s,
            "names": {str(k): v for k, v in self.names.items()},
        }


def _fit(features: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Least squares, coefficients clipped at zero (never a negative marginal cost)."""
    coef, *_ = np.linalg.lstsq(features, seconds, rcond=None)
    return np.clip(coef, 0.0, None)


class LatencyModel:
    """Fitted step times by configuration; `decode(cfg, batch, ctx)`, `prefill(cfg, tokens)`."""

    def __init__(self, table: LatencyTable) -> None:
        if WHOLE not in table.decode or WHOLE not in table.prefill:
            raise ValueError("latency table: the whole GPU (WHOLE) needs decode and prefill points")
        self.table = table
        self._decode: dict[int, np.ndarray] = {}
        self._prefill: dict[int, np.ndarray] = {}
        for cfg, points in table.decode.items():
            arr = np.asarray(points, dtype=np.float64)
            if arr.ndim != 2 or len(arr) < 1:
                raise ValueError(f"latency table: no decode points for configuration {cfg}")
            feats = np.stack([np.ones(len(arr)), arr[:, 0], arr[:, 1]], axis=1)
            self._decode[cfg] = _fit(feats, arr[:, 2])
        for cfg, ppoints in table.prefill.items():
            arr = np.asarray(ppoints, dtype=np.float64)
            if arr.ndim != 2 or len(arr) < 1:
                raise ValueError(f"latency table: no prefill points for configuration {cfg}")
            feats = np.stack([np.ones(len(arr)), arr[:, 0], arr[:, 0] ** 2], axis=1)
            self._prefill[cfg] = _fit(feats, arr[:, 1])

    @property
    def presets(self) -> list[int]:
        return sorted(c for c in self._decode if c != WHOLE and c in self._prefill)

    def decode(self, cfg: int, batch: int, context_tokens: int) -> float:
        a, b, c = self._decode[cfg]
        return float(a + b * batch + c * context_tokens)

    def prefill(self, cfg: int, tokens: int) -> float:
        a, b, c = self._prefill[cfg]
        return float(a + b * tokens + c * tokens * tokens)

    def sequential(self, batch: int, context_tokens: int, tokens: int) -> float:
        """Both parts on the whole GPU, one after the other."""
        return self.decode(WHOLE, batch, context_tokens) + self.prefill(WHOLE, tokens)

    def concurrent(self, cfg: int, batch: int, context_tokens: int, tokens: int) -> float:
        return (
            max(self.decode(cfg, batch, context_tokens), self.prefill(cfg, tokens))
            + self.table.switch_overhead_s
        )


@dataclass(frozen=True, slots=True)
class PlanChoice:
    """A step's plan: `preset` index or None (the whole GPU, parts in turn), its predicted time
    (corrected by what similar steps measured), the model's raw prediction, and whether the
    bound is met."""

    preset: int | None
    predicted_s: float
    within_bound: bool
    raw_s: float = 0.0

    @property
    def concurrent(self) -> bool:
        return self.preset is not None


class Planner:
    """Chooses per step: adaptive (the model's fastest option under the TPOT bound), or a fixed
    preset (`static_preset`; WHOLE: always the whole GPU) whenever both sides have work.
    Counts choices for metrics."""

    def __init__(
        self,
        model: LatencyModel,
        tpot_bound_s: float,
        static_preset: int | None = None,
    ) -> None:
        if tpot_bound_s <= 0:
            raise ValueError(f"sm_share_tpot_ms: must be positive, got {tpot_bound_s * 1e3}")
        if static_preset not in (None, WHOLE, *model.presets):
            raise ValueError(f"static preset {static_preset}: not one of {model.presets}")
        self.model = model
        self.tpot_bound_s = tpot_bound_s
        self.static_preset = static_preset
        self.counts: Counter[str] = Counter()
        self.bound_misses = 0
        # measured / predicted by option (preset index, None = time-share), learnt online from
        # served steps: the profile times each side alone, a co-run also shares bandwidth/L2.
        self.correction: dict[int | None, float] = {}

    def name(self, preset: int | None) -> str:
        if preset is None:
            return WHOLE_NAME
        return self.model.table.names.get(preset, str(preset))

    def choose(self, batch: int, context_tokens: int, prefill_tokens: int) -> PlanChoice:
        """The plan for a step of `batch` decode rows (holding `context_tokens` in all) and
        `prefill_tokens` prefill tokens."""
        model = self.model
        if batch == 0 or prefill_tokens == 0:
            # One side is empty: nothing to run beside it, the whole GPU serves the other.
            choice = PlanChoice(None, 0.0, True)
        elif self.static_preset == WHOLE:
            raw = model.sequential(batch, context_tokens, prefill_tokens)
            t = raw * self.factor(None)
            choice = PlanChoice(None, t, t <= self.tpot_bound_s, raw)
        elif self.static_preset is not None:
            raw = model.concurrent(self.static_preset, batch, context_tokens, prefill_tokens)
            t = raw * self.factor(self.static_preset)
            choice = PlanChoice(self.static_preset, t, t <= self.tpot_bound_s, raw)
        else:
            raws = [(model.sequential(batch, context_tokens, prefill_tokens), None)]
            raws += [
                (model.concurrent(p, batch, context_tokens, prefill_tokens), p)
                for p in model.presets
            ]
            options = [(raw * self.factor(p), p, raw) for raw, p in raws]
            feasible = [o for o in options if o[0] <= self.tpot_bound_s]
            # Ties go to the whole GPU (listed first; min keeps the first), then fewer decode SMs.
            t, preset, raw = min(feasible or options, key=lambda o: o[0])
            choice = PlanChoice(preset, t, bool(feasible), raw)
        self.counts[self.name(choice.preset)] += 1
        if not choice.within_bound:
            self.bound_misses += 1
        return choice

    def observe(self, choice: PlanChoice, measured_s: float, weight: float = 0.2) -> None:
        """Feeds back a served step's measured time: the option's correction factor moves
        `weight` of the way to measured / raw prediction (clipped to [0.25, 4])."""
        if choice.raw_s <= 0 or measured_s <= 0:
            return
        ratio = min(4.0, max(0.25, measured_s / choice.raw_s))
        old = self.factor(choice.preset)
        self.correction[choice.preset] = (1 - weight) * old + weight * ratio

    def factor(self, preset: int | None) -> float:
        """The correction factor of an option: its own once measured; for a preset not yet
        measured, the mean of the measured presets' (1.0 before any)."""
        if preset in self.correction:
            return self.correction[preset]
        if preset is None:
            return 1.0
        measured = [f for p, f in self.correction.items() if p is not None]
        return float(np.mean(measured)) if measured else 1.0

    def best_time(self, batch: int, context_tokens: int, prefill_tokens: int) -> float:
        """The fastest option's predicted (corrected) step time, without counting it."""
        model = self.model
        options = [model.sequential(batch, context_tokens, prefill_tokens) * self.factor(None)]
        options += [
            model.concurrent(p, batch, context_tokens, prefill_tokens) * self.factor(p)
            for p in model.presets
        ]
        return min(options)

    def prefill_budget(
        self, batch: int, context_tokens: int, granularity: int = 64, limit: int = 1 << 16
    ) -> int:
        """The largest prefill chunk (a multiple of `granularity`, at most `limit`) whose best
        predicted step keeps a decode batch under the TPOT bound; 0 when even the smallest
        does not. In a joined step the bound cannot change which option is fastest, only how
        much prefill fits beside the decode batch: this is the knob a scheduler's token budget
        can take from it. Predictions never fall as tokens grow, so a binary search is exact."""
        if self.best_time(batch, context_tokens, granularity) > self.tpot_bound_s:
            return 0
        lo, hi = 1, max(1, limit // granularity)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.best_time(batch, context_tokens, mid * granularity) <= self.tpot_bound_s:
                lo = mid
            else:
                hi = mid - 1
        return lo * granularity

    def metrics(self) -> dict[str, float]:
        """Chosen presets so far (by name), steps predicted over the bound, and the learnt
        correction factors."""
        out: dict[str, float] = {
            f"sm_share/steps/{name}": n for name, n in sorted(self.counts.items())
        }
        out["sm_share/tpot_bound_misses"] = self.bound_misses
        for preset, factor in self.correction.items():
            out[f"sm_share/correction/{self.name(preset)}"] = round(factor, 4)
        return out
