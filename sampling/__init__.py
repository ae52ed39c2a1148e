"""History-informed sampling: which prompts to roll out, how many samples, in what order, and
speculative drafts from earlier responses. Engine-independent: sees prompt keys, rewards,
lengths and token ids only, and imports nothing else of rollout_accel. See README.md.
"""

from __future__ import annotations

from .allocator import Allocation, AllocatorConfig, Budget, SampleAllocator
from .drafts import DraftConfig, DraftIndex, corpus_request
from .errors import (
    CheckpointNotFoundError,
    HistoryFormatError,
    HistorySchemaError,
    InvalidArgumentError,
    InvalidConfigError,
    InvalidPromptKeyError,
    InvalidRecordError,
    ReadOnlyHistoryError,
    SamplingError,
    UnknownPromptError,
)
from .history import GlobalStats, GroupHistoryEntry, HistoryConfig, HistoryStore
from .length import LengthConfig, LengthEstimate, LengthPredictor, longest_first
from .planner import PlannedPrompt, PlannerConfig, RolloutPlan, RolloutPlanner
from .records import GroupOutcome, GroupRecord, PromptKey, PromptStats, prompt_key_for_tokens
from .selector import (
    Decision,
    PromptSelector,
    Reason,
    SelectionResult,
    SelectorConfig,
    SelectorState,
)
from .synthetic_trace import SyntheticLongtailTrace, TraceConfig, TraceGroup, trace_statistics

__all__ = [
    "Allocation",
    "AllocatorConfig",
    "Budget",
    "CheckpointNotFoundError",
    "Decision",
    "DraftConfig",
    "DraftIndex",
    "GlobalStats",
    "GroupHistoryEntry",
    "GroupOutcome",
    "GroupRecord",
    "HistoryConfig",
    "HistoryFormatError",
    "HistorySchemaError",
    "HistoryStore",
    "InvalidArgumentError",
    "InvalidConfigError",
    "InvalidPromptKeyError",
    "InvalidRecordError",
    "LengthConfig",
    "LengthEstimate",
    "LengthPredictor",
    "PlannedPrompt",
    "PlannerConfig",
    "PromptKey",
    "PromptSelector",
    "PromptStats",
    "ReadOnlyHistoryError",
    "Reason",
    "RolloutPlan",
    "RolloutPlanner",
    "SampleAllocator",
    "SamplingError",
    "SelectionResult",
    "SelectorConfig",
    "SelectorState",
    "SyntheticLongtailTrace",
    "TraceConfig",
    "TraceGroup",
    "UnknownPromptError",
    "corpus_request",
    "longest_first",
    "prompt_key_for_tokens",
    "trace_statistics",
]
