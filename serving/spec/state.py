"""The engine's speculative-decoding state, attached as `engine.spec`.

Holds the config, the external-corpus registry (fed by the corpus routes from any thread), the
proposer (engine thread only) and run totals. `attach_spec(engine, config)` creates it; the engine
and the routes find it with `spec_of(engine)` (None: speculation off).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rollout_accel.serving.spec.config import SpecConfig
from rollout_accel.serving.spec.corpus import CorpusRegistry
from rollout_accel.serving.spec.draft_index import IndexConfig
from rollout_accel.serving.spec.proposer import Proposer, RequestDrafts


@dataclass(slots=True)
class SpecTotals:
    """Engine-wide counters since start (for benchmarks and /server_info)."""

    verify_steps: int = 0  # decode forwards of requests while speculation is on
    drafted_rows: int = 0  # of those, rows that carried drafts
    draft_tokens: int = 0
    accepted_tokens: int = 0

    def to_dict(self) -> dict[str, float]:
        return {
            "verify_steps": self.verify_steps,
            "drafted_rows": self.drafted_rows,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "accept_rate": self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0,
            "tokens_per_verify": (
                (self.verify_steps + self.accepted_tokens) / self.verify_steps
                if self.verify_steps
                else 0.0
            ),
        }


class SpecState:
    def __init__(
        self,
        config: SpecConfig,
        vocab_size: int | None = None,
        encode: Any = None,
    ) -> None:
        self.config = config
        self.encode = encode
        self.registry = CorpusRegistry(
            config.max_corpus_tokens,
            IndexConfig(
                min_anchor=config.min_match,
                max_anchor=config.max_anchor,
                max_match=config.max_match,
            ),
            vocab_size,
        )
        self.proposer = Proposer(config, self.registry)
        self.totals = SpecTotals()
        # Off: the engine decodes plainly (and overlaps steps); benchmarks flip it to compare.
        self.active = True

    def record_verify(self, req: Any, drafted: int, accepted: int) -> None:
        """A decode step of `req` while speculation is on (engine thread)."""
        self.proposer.on_verified(req, drafted, accepted)
        t = self.totals
        t.verify_steps += 1
        if drafted:
            t.drafted_rows += 1
            t.draft_tokens += drafted
            t.accepted_tokens += accepted

    def meta(self, req: Any) -> dict[str, Any]:
        """SGLang's speculative fields for `req`'s meta_info (before `on_finished`)."""
        return request_meta(self.proposer.requests.get(req.rid), len(req.output_ids))

    def on_finished(self, req: Any) -> None:
        """The request left the engine: its response joins its group's sibling index (unless
        it failed) and its drafting state goes."""
        self.proposer.on_finished(req, add_to_group=getattr(req, "error", None) is None)


def request_meta(st: RequestDrafts | None, completion_tokens: int) -> dict[str, Any]:
    """SGLang's per-request speculative fields of `meta_info` (empty before any verify step)."""
    if st is None or st.verify_ct == 0:
        return {}
    return {
        "spec_verify_ct": st.verify_ct,
        "spec_accept_length": completion_tokens / st.verify_ct,
        "spec_accept_token_num": st.accept_token_num,
        "spec_draft_token_num": st.draft_token_num,
        "spec_accept_rate": (
            st.accept_token_num / st.draft_token_num if st.draft_token_num else 0.0
        ),
    }


def attach_spec(engine: Any, config: SpecConfig | None) -> SpecState | None:
    """Create `engine.spec` for this config (tokenizer and vocabulary from the engine); None
    (speculation off) when `config` is None or has no algorithm."""
    if config is None or not config.enabled:
        engine.spec = None
        return None
    tokenizer = getattr(engine, "tokenizer", None)
    model_config = getattr(engine, "model_config", None)
    state = SpecState(
        config,
        vocab_size=getattr(model_config, "vocab_size", None),
        encode=tokenizer.encode if tokenizer is not None else None,
    )
    engine.spec = state
    return state


def spec_of(engine: Any) -> SpecState | None:
    state = getattr(engine, "spec", None)
    return state if isinstance(state, SpecState) and state.config.enabled else None
