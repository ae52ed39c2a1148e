"""slime's `Sample`, `RolloutFnTrainOutput` and `RolloutFnEvalOutput`: slime's own classes when
slime is importable, otherwise field-for-field compatible fallbacks (slime v0.3 layout), so the
same controller code runs inside slime and on a laptop without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

try:  # pragma: no cover - exercised only where slime is installed
    from slime.rollout.base_types import RolloutFnEvalOutput, RolloutFnTrainOutput
    from slime.utils.types import Sample

    SLIME_AVAILABLE = True
except ImportError:
    SLIME_AVAILABLE = False

    @dataclass
    class Sample:  # type: ignore[no-redef]
        """The fallback of slime.utils.types.Sample (same fields, same defaults)."""

        group_index: int | None = None
        index: int | None = None
        prompt: str | list[dict[str, str]] = ""
        tokens: list[int] = field(default_factory=list)
        multimodal_inputs: dict[str, Any] | None = None
        multimodal_train_inputs: dict[str, Any] | None = None
        response: str = ""
        response_length: int = 0
        label: str | None = None
        reward: float | dict[str, Any] | None = None
        loss_mask: list[int] | None = None
        weight_versions: list[str] = field(default_factory=list)
        rollout_log_probs: list[float] | None = None
        rollout_routed_experts: list[list[int]] | None = None
        remove_sample: bool = False
        teacher_log_probs: list[float] | None = None

        class Status(Enum):
            PENDING = "pending"
            COMPLETED = "completed"
            TRUNCATED = "truncated"
            ABORTED = "aborted"
            FAILED = "failed"

        status: Status = Status.PENDING
        metadata: dict = field(default_factory=dict)
        generate_function_path: str | None = None
        train_metadata: dict | None = None
        session_id: str | None = None
        non_generation_time: float = 0.0

        def to_dict(self) -> dict[str, Any]:
            value = self.__dict__.copy()
            value["status"] = self.status.value
            return value

        @staticmethod
        def from_dict(data: dict[str, Any]) -> Sample:
            data = dict(data)
            data["status"] = Sample.Status(data["status"])
            names = set(Sample.__dataclass_fields__)
            sample = Sample(**{k: v for k, v in data.items() if k in names})
            for key, value in data.items():
                if key not in names:
                    setattr(sample, key, value)
            return sample

        @property
        def effective_response_length(self) -> int:
            return sum(self.loss_mask) if self.loss_mask is not None else self.response_length

    @dataclass
    class RolloutFnTrainOutput:  # type: ignore[no-redef]
        samples: list[list[Sample]]
        metrics: dict[str, Any] | None = None

    @dataclass
    class RolloutFnEvalOutput:  # type: ignore[no-redef]
        data: dict[str, dict[str, Any]]
        metrics: dict[str, Any] | None = None


Status = Sample.Status

__all__ = ["SLIME_AVAILABLE", "RolloutFnEvalOutput", "RolloutFnTrainOutput", "Sample", "Status"]
