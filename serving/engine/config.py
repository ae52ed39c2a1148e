"""Engine arguments (SGLang's names where SGLang has the same knob)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How to build and run one engine.

    max_total_tokens: KV slots; None = derived (CPU: a fixed default, GPU: from free memory after
    loading the weights, times mem_fraction_static).
    """

    model_path: str = "tiny-qwen3"
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    max_total_tokens: int | None = None
    mem_fraction_static: float = 0.85
    max_running_requests: int = 256
    max_prefill_tokens: int = 4096
    context_length: int | None = None
    schedule_policy: str = "fcfs"  # fcfs | lpm | hrrn | slo
    schedule_window: int = 32  # slo: oldest waiting requests scored per step
    ttft_slo_ms: float = 5000.0  # slo: TTFT deadline of requests that carry none
    enable_prefix_caching: bool = True
    cuda_graph: bool = True
    cuda_graph_max_bs: int = 256
    overlap_schedule: bool = True  # GPU: queue decode step N+1 before processing step N
    weight_version: str = "default"

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        known = {f.name for f in fields(cls)}
        for key in kwargs:
            if key not in known:
                raise ValueError(f"engine argument {key!r} is unknown; known: {sorted(known)}")
        config = cls(**kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        for name in ("max_running_requests", "max_prefill_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if isinstance(self.schedule_window, bool) or not isinstance(self.schedule_window, int):
            raise ValueError(f"schedule_window: must be an integer, got {self.schedule_window!r}")
        if self.schedule_window < 1:
            raise ValueError(f"schedule_window: must be >= 1, got {self.schedule_window}")
        if isinstance(self.ttft_slo_ms, bool) or not isinstance(self.ttft_slo_ms, int | float):
            raise ValueError(f"ttft_slo_ms: must be a number, got {self.ttft_slo_ms!r}")
        if not self.ttft_slo_ms > 0:
            raise ValueError(f"ttft_slo_ms: must be > 0, got {self.ttft_slo_ms}")
        if self.max_total_tokens is not None and self.max_total_tokens < 16:
            raise ValueError(f"max_total_tokens: must be >= 16, got {self.max_total_tokens}")
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError("mem_fraction_static: must be in (0, 1)")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device: expected auto, cpu or cuda[:N], got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
