"""Speculative-decoding settings (SGLang's flag names where SGLang has the knob)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ALGORITHMS = ("NGRAM",)


@dataclass(frozen=True, slots=True)
class SpecConfig:
    """How the engine drafts and verifies.

    algorithm: None (off) or "NGRAM" (`--speculative-algorithm`).
    num_draft_tokens: the verify window (`--speculative-num-draft-tokens`): a row scores its last
        token plus up to num_draft_tokens - 1 draft tokens in one forward.
    max_corpus_tokens: all external corpora together
        (`--speculative-ngram-external-corpus-max-tokens`).
    min_match / max_anchor / max_match: suffix-match lengths (`--speculative-ngram-min-match-
        window-size` / `-max-match-window-size`, and how far back candidates are ranked).
    draft_cost: cost of verifying one more token, as a fraction of a decode step. A request
        drafts k tokens while its estimated per-token acceptance a has a**k >= draft_cost (the
        k-th draft token is worth verifying); a < draft_cost stops drafting. GPU decode is
        memory-bound (small cost); CPU forwards are compute-bound (use ~0.3-0.5).
    verify_token_budget: most tokens (rows x (1 + drafts)) in one verify batch; large batches
        draft shorter so verification stays near decode cost when the step turns compute-bound.
    accept_decay: weight of the past in the per-request acceptance estimate, per verify step.
    probe_every: a request that stopped drafting drafts one token every this many steps, so it
        can recover when its text starts repeating.
    min_batch_gain: a step drafts only if its rows' expected accepted draft tokens, summed, reach
        this many per row of the batch (probe steps excepted): a drafting step is synchronous and
        scores 1 + k tokens a row, so one eager row must not make the whole batch pay for it.
    max_groups / max_group_tokens: sibling indexes kept (LRU) and tokens per sibling group.
    """

    algorithm: str | None = None
    num_draft_tokens: int = 6
    max_corpus_tokens: int = 10_000_000
    min_match: int = 1
    max_anchor: int = 4
    max_match: int = 16
    draft_cost: float = 0.1
    verify_token_budget: int = 4096
    accept_decay: float = 0.8
    probe_every: int = 16
    min_batch_gain: float = 0.25
    max_groups: int = 4096
    max_group_tokens: int = 1 << 18

    def __post_init__(self) -> None:
        if self.algorithm is not None and self.algorithm.upper() not in ALGORITHMS:
            raise ValueError(
                f"speculative_algorithm: {self.algorithm!r} is not supported (only NGRAM)"
            )
        if not isinstance(self.num_draft_tokens, int) or not 2 <= self.num_draft_tokens <= 16:
            raise ValueError("speculative_num_draft_tokens: must be an integer in [2, 16]")
        if not 1 <= self.min_match <= self.max_anchor <= self.max_match:
            raise ValueError("speculative matching needs 1 <= min_match <= max_anchor <= max_match")
        if not 0.0 < self.draft_cost < 1.0:
            raise ValueError("speculative_draft_cost: must be in (0, 1)")
        if not 0.0 <= self.accept_decay < 1.0:
            raise ValueError("accept_decay: must be in [0, 1)")
        if self.min_batch_gain < 0.0:
            raise ValueError("min_batch_gain: must be >= 0")
        if self.max_corpus_tokens < 1:
            raise ValueError("speculative_ngram_external_corpus_max_tokens: must be >= 1")
        for name in (
            "verify_token_budget",
            "probe_every",
            "max_groups",
            "max_group_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1")

    @property
    def enabled(self) -> bool:
        return self.algorithm is not None

    @property
    def max_drafts(self) -> int:
        return self.num_draft_tokens - 1


def spec_config_from(engine_config: Any, cuda: bool) -> SpecConfig | None:
    """The SpecConfig of an EngineConfig's `speculative_*` fields (None: speculation off).

    Raises ValueError naming the flag for bad values. `speculative_draft_cost` None picks 0.1 on
    CUDA (decode is memory-bound: extra verified tokens are nearly free) and 0.3 on the CPU.
    """
    algorithm = engine_config.speculative_algorithm
    if algorithm is None:
        return None
    if not isinstance(algorithm, str) or algorithm.upper() not in ALGORITHMS:
        raise ValueError(f"speculative_algorithm: {algorithm!r} is not supported (only NGRAM)")
    cost = engine_config.speculative_draft_cost
    return SpecConfig(
        algorithm=algorithm.upper(),
        num_draft_tokens=engine_config.speculative_num_draft_tokens,
        max_corpus_tokens=engine_config.speculative_ngram_external_corpus_max_tokens,
        draft_cost=(0.1 if cuda else 0.3) if cost is None else cost,
    )
