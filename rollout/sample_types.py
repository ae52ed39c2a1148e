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
        rollout_id: int | None = None
        prompt: str | list[dict[str, str]] = ""
        tokens: list[int] = field(default_factory=list)
        multimodal_inputs: dict[str, Any] | None = None
        multimodal_train_inputs: dict[str, Any] | None = None
        multimodal_train_input_id: str | None = None
        apply_chat_template_kwargs: dict = field(default_factory=dict)
        response: str = ""
        response_length: int = 0
        label: str | None = None
        reward: float | dict[str, Any] | None = None
        loss_mask: list[int] | None = None
        weight_versions: list[str] = field(default_factory=list)
        rollout_log_probs: list[float] | None = None
        rollout_top_p_token_ids: list[int] | None = None
        rollout_top_p_token_offsets: list[int] | None = None
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
        custom_rm_path: str | None = None
        non_generation_time: float = 0.0

        @dataclass
        class SpecInfo:
            spec_accept_token_num: int = 0
            spec_draft_token_num: int = 0
            spec_verify_ct: int = 0
            completion_token_num: int = 0

            def add(self, meta_info: dict) -> None:
                self.spec_accept_token_num += meta_info.get("spec_accept_token_num", 0)
                self.spec_draft_token_num += meta_info.get("spec_draft_token_num", 0)
                self.spec_verify_ct += meta_info.get("spec_verify_ct", 0)
                self.completion_token_num += meta_info.get("completion_tokens", 0)

        @dataclass
        class PrefixCacheInfo:
            cached_tokens: int = 0
            total_prompt_tokens: int = 0

            def add(self, meta_info: dict) -> None:
                self.cached_tokens += meta_info.get("cached_tokens", 0)
                self.total_prompt_tokens += meta_info.get("prompt_tokens", 0)

        spec_info: SpecInfo = field(default_factory=SpecInfo)
        prefix_cache_info: PrefixCacheInfo = field(default_factory=PrefixCacheInfo)

        def get_reward_value(self, args: Any) -> Any:
            key = getattr(args, "reward_key", None)
            return self.reward if not key else self.reward[key]

        def to_dict(self) -> dict[str, Any]:
            value = self.__dict__.copy()
            value["status"] = self.status.value
            value["spec_info"] = self.spec_info.__dict__.copy()
            value["prefix_cache_info"] = self.prefix_cache_info.__dict__.copy()
            return value

        @staticmethod
        def from_dict(data: dict[str, Any]) -> Sample:
            data = dict(data)
            data["status"] = Sample.Status(data["status"])
            data["spec_info"] = Sample.SpecInfo(**data.get("spec_info", {}))
            data["prefix_cache_info"] = Sample.PrefixCacheInfo(**data.get("prefix_cache_info", {}))
            names = set(Sample.__dataclass_fields__)
            sample = Sample(**{k: v for k, v in data.items() if k in names})
            for key, value in data.items():
                if key not in names:
                    setattr(sample, key, value)
            return sample

        @property
        def effective_response_length(self) -> int:
            return sum(self.loss_mask) if self.loss_mask is not None else self.response_length

        def append_response_tokens(
            self,
            args: Any = None,
            *,
            tokens: list[int] | None = None,
            log_probs: list[float] | None = None,
            trainable: bool = True,
            meta_info: dict | None = None,
            text: str | None = None,
            update_terminal_info: bool = True,
        ) -> None:
            """The fallback of slime's method of the same name (same rules): append response
            tokens keeping loss_mask and rollout_log_probs as long as the response; trainable
            tokens need log probs, non-trainable ones get mask 0 and log prob 0.0; meta_info
            updates prefix-cache (and, with speculative decoding, spec) stats, weight_versions
            and status from finish_reason. Top-p replay and routed experts are slime-only."""
            tokens = [int(t) for t in tokens or []]
            log_probs = None if log_probs is None else [float(x) for x in log_probs]
            if log_probs is not None and len(log_probs) != len(tokens):
                raise ValueError(
                    f"log_probs length {len(log_probs)} != tokens length {len(tokens)}"
                )
            if tokens and trainable and log_probs is None:
                raise ValueError("trainable response tokens require rollout log probabilities.")
            if tokens and not trainable:
                if log_probs is not None:
                    raise ValueError(
                        "non-trainable response tokens should not pass rollout log probabilities."
                    )
                log_probs = [0.0] * len(tokens)
            if text is not None:
                self.response += text
            before = self.response_length
            if tokens:
                self.tokens = list(self.tokens) + tokens
                self.response_length += len(tokens)
                if self.loss_mask is None:
                    self.loss_mask = [1] * before
                self.loss_mask = list(self.loss_mask) + [1 if trainable else 0] * len(tokens)
            if log_probs is not None:
                if self.rollout_log_probs is None:
                    if trainable and before:
                        raise ValueError(
                            "Cannot append trainable rollout log probabilities to a sample with "
                            "existing response tokens but no existing rollout_log_probs."
                        )
                    self.rollout_log_probs = [0.0] * before
                self.rollout_log_probs = list(self.rollout_log_probs) + log_probs
            if meta_info is not None and update_terminal_info and "finish_reason" in meta_info:
                if getattr(args, "sglang_speculative_algorithm", False):
                    self.spec_info.add(meta_info)
                self.prefix_cache_info.add(meta_info)
                if "weight_version" in meta_info:
                    self.weight_versions = [*self.weight_versions, meta_info["weight_version"]]
                kind = (meta_info["finish_reason"] or {}).get("type")
                status = {
                    "length": Sample.Status.TRUNCATED,
                    "abort": Sample.Status.ABORTED,
                    "stop": Sample.Status.COMPLETED,
                }.get(kind)
                if status is not None:
                    self.status = status
            if self.loss_mask is not None and len(self.loss_mask) != self.response_length:
                raise ValueError(
                    f"loss_mask length {len(self.loss_mask)} != response_length "
                    f"{self.response_length}"
                )
            if (
                self.rollout_log_probs is not None
                and len(self.rollout_log_probs) != self.response_length
            ):
                raise ValueError(
                    f"rollout_log_probs length {len(self.rollout_log_probs)} != "
                    f"response_length {self.response_length}"
                )

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
