"""Online per-stage latency predictor: the cost of one layer and of a stage's extra work (the
embedding on stage 0; the final norm, LM head and sampler on the last stage) as linear functions
of a micro-batch's shape, fit by exponentially weighted least squares from measured timings.

Features (`StepFeatures`): sequences, total context tokens, prefill tokens for layers; emitting
rows split by sampling mode (greedy / sampled / filtered by top-k/top-p/min-p) for the head.
Invariant: a prediction for a stage with no observations yet falls back to the pooled fit of all
stages (stages on one host are alike), and to 0 with no data at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class StepFeatures:
    """The shape of one micro-batch, as the predictor sees it."""

    batch: int
    context_tokens: int
    prefill_tokens: int
    emitting: int
    sampled: int  # emitting rows with temperature > 0
    filtered: int  # emitting rows with top-k / top-p / min-p filtering

    def layer_x(self) -> np.ndarray:
        return np.array(
            [1.0, self.batch, self.context_tokens / 1e3, self.prefill_tokens / 1e3], np.float64
        )

    def extra_x(self) -> np.ndarray:
        return np.array(
            [1.0, self.emitting, self.sampled, self.filtered, self.prefill_tokens / 1e3], np.float64
        )

    def __add__(self, other: StepFeatures) -> StepFeatures:
        return StepFeatures(*(a + b for a, b in zip(self.astuple(), other.astuple(), strict=True)))

    def astuple(self) -> tuple[int, ...]:
        return (
            self.batch,
            self.context_tokens,
            self.prefill_tokens,
            self.emitting,
            self.sampled,
            self.filtered,
        )


class OnlineLeastSquares:
    """y ~ w . x with forgetting factor `decay` (recent steps weigh more) and a small ridge."""

    def __init__(self, dim: int, decay: float = 0.98, ridge: float = 1e-6) -> None:
        self.a = np.zeros((dim, dim))
        self.b = np.zeros(dim)
        self.decay = decay
        self.ridge = ridge
        self.count = 0
        self._w: np.ndarray | None = None

    def update(self, x: np.ndarray, y: float) -> None:
        self.a = self.decay * self.a + np.outer(x, x)
        self.b = self.decay * self.b + x * y
        self.count += 1
        self._w = None

    @property
    def weights(self) -> np.ndarray:
        if self._w is None:
            dim = len(self.b)
            scale = max(float(np.trace(self.a)) / dim, 1e-12)
            self._w = np.linalg.solve(self.a + self.ridge * scale * np.eye(dim), self.b)
        return self._w

    def predict(self, x: np.ndarray) -> float:
        if self.count == 0:
            return 0.0
        return max(float(self.weights @ x), 0.0)


class PredictionError:
    """Relative error |predicted - measured| / measured of predictions made before the
    measurement was fit (honest, out-of-sample)."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.recent = 0.0

    def add(self, predicted: float, measured: float) -> None:
        if measured <= 0:
            return
        err = abs(predicted - measured) / measured
        self.count += 1
        self.total += err
        self.recent = err if self.count == 1 else 0.9 * self.recent + 0.1 * err

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")


class LatencyPredictor:
    """Per-stage layer and extra-work models; `stage_time` predicts a stage for any layer count."""

    WARMUP = 8  # observations before a stage's prediction is scored

    def __init__(self, pp_size: int) -> None:
        self.pp_size = pp_size
        self.layer = [OnlineLeastSquares(4) for _ in range(pp_size)]
        self.extra = [OnlineLeastSquares(5) for _ in range(pp_size)]
        self.pooled_layer = OnlineLeastSquares(4)
        self.errors = [PredictionError() for _ in range(pp_size)]

    def layer_cost(self, stage: int, feats: StepFeatures) -> float:
        model = self.layer[stage] if self.layer[stage].count else self.pooled_layer
        return model.predict(feats.layer_x())

    def extra_cost(self, stage: int, feats: StepFeatures) -> float:
        return self.extra[stage].predict(feats.extra_x())

    def stage_time(self, stage: int, feats: StepFeatures, num_layers: int) -> float:
        return num_layers * self.layer_cost(stage, feats) + self.extra_cost(stage, feats)

    def observe(
        self, stage: int, feats: StepFeatures, num_layers: int, t_layers: float, t_extra: float
    ) -> None:
        """One micro-batch's measured times on `stage` (seconds)."""
        if self.layer[stage].count >= self.WARMUP:
            self.errors[stage].add(self.stage_time(stage, feats, num_layers), t_layers + t_extra)
        if num_layers > 0:
            per_layer = t_layers / num_layers
            self.layer[stage].update(feats.layer_x(), per_layer)
            self.pooled_layer.update(feats.layer_x(), per_layer)
        self.extra[stage].update(feats.extra_x(), t_extra)

    def report(self) -> dict[str, object]:
        return {
            "mean_rel_error": [e.mean for e in self.errors],
            "recent_rel_error": [e.recent for e in self.errors],
            "scored": [e.count for e in self.errors],
        }
