"""Engine arguments (SGLang's names where SGLang has the same knob)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

DEFAULT_PREFILL_GRAPH_TOKENS = 4096  # the default cap on graphed prefill chunks


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
    # Prefill chunks of up to this many tokens replay CUDA graphs, alone or right after a mixed
    # step's decode graph (None: max_prefill_tokens up to 4096, where graphs still pay; 0: off,
    # mixed steps run one eager forward).
    prefill_cuda_graph_max_tokens: int | None = None
    # Launch step N+1 before processing step N. None: on for CUDA (where launches are async), off
    # on the CPU (where a launch computes synchronously, so there is nothing to overlap).
    overlap_schedule: bool | None = None
    weight_version: str = "default"
    # Run mixed steps' decode and prefill concurrently on disjoint SM partitions (green contexts;
    # GPU with compute capability >= 9.0 and CUDA driver >= 12.4, else off with a log line).
    sm_share: bool = False
    sm_share_tpot_ms: float = 50.0  # bound on a mixed step's time the split choice keeps under
    # KV reuse (serving/kvreuse): prompts with segments reuse stored chunk KV and recompute this
    # share of the reused tokens (1.0 = full prefill); chunks may take this share of the KV slots.
    kv_reuse: bool = True
    kv_reuse_recompute_ratio: float = 0.15
    kv_reuse_check_layer: int = 1
    kv_reuse_max_chunk_fraction: float = 0.5
    kv_reuse_separator: str | None = None
    # Speculative decoding (serving/spec): SGLang's NGRAM flags; draft_cost None = by device.
    speculative_algorithm: str | None = None
    speculative_num_draft_tokens: int = 6
    speculative_ngram_external_corpus_max_tokens: int = 10_000_000
    speculative_draft_cost: float | None = None
    # Pipeline parallelism (serving/pipeline/): stages, the initial split as layer counts per
    # stage ("3,1"; None = even, leftovers last), micro-batches per step (0 = pp_size), and
    # dynamic layer rebalancing from predicted stage latencies; per-stage decode CUDA graphs
    # (opt-in until measured on GPUs; CUDA only, and only with cuda_graph on).
    pp_size: int = 1
    pp_partition: str | None = None
    pp_microbatches: int = 0
    pp_rebalance: bool = False
    pp_cuda_graph: bool = False

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
        if not isinstance(self.pp_size, int) or self.pp_size < 1:
            raise ValueError(f"pp_size: must be a positive integer, got {self.pp_size!r}")
        if not isinstance(self.pp_microbatches, int) or self.pp_microbatches < 0:
            raise ValueError(f"pp_microbatches: must be >= 0, got {self.pp_microbatches!r}")
        if not isinstance(self.pp_cuda_graph, bool):
            raise ValueError(f"pp_cuda_graph: must be true or false, got {self.pp_cuda_graph!r}")
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError("mem_fraction_static: must be in (0, 1)")
        cap = self.prefill_cuda_graph_max_tokens
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
            raise ValueError(
                f"prefill_cuda_graph_max_tokens: must be an integer >= 0 (0 = off), got {cap!r}"
            )
        if not isinstance(self.sm_share, bool):
            raise ValueError(f"sm_share: must be true or false, got {self.sm_share!r}")
        tpot = self.sm_share_tpot_ms
        if isinstance(tpot, bool) or not isinstance(tpot, int | float) or not tpot > 0:
            raise ValueError(f"sm_share_tpot_ms: must be a positive number, got {tpot!r}")
        if not 0.0 <= self.kv_reuse_recompute_ratio <= 1.0:
            raise ValueError("kv_reuse_recompute_ratio: must be in [0, 1]")
        if not 0.0 < self.kv_reuse_max_chunk_fraction <= 1.0:
            raise ValueError("kv_reuse_max_chunk_fraction: must be in (0, 1]")
        if self.kv_reuse_check_layer < 1:
            raise ValueError("kv_reuse_check_layer: must be >= 1")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device: expected auto, cpu or cuda[:N], got {self.device!r}")
        from rollout_accel.serving.spec.config import spec_config_from

        spec_config_from(self, cuda=False)  # raises ValueError naming a bad speculative flag

    def prefill_graph_tokens(self) -> int:
        """The largest prefill chunk replayed from graphs (0: none); SM sharing needs them."""
        cap = self.prefill_cuda_graph_max_tokens
        if self.sm_share:
            return self.max_prefill_tokens
        if cap is None:
            # Larger chunks are compute-bound (launches are a few percent of them), while every
            # bucket costs capture time and pool memory.
            return min(self.max_prefill_tokens, DEFAULT_PREFILL_GRAPH_TOKENS)
        return min(cap, self.max_prefill_tokens)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
