"""Speculative decoding from rollout history: draft indexes per corpus, exact verification.

config       SpecConfig (SGLang's --speculative-* names)
draft_index  NgramIndex (documents -> hashed n-grams, voted continuations, cursors), SelfIndex
corpus       CorpusRegistry: SGLang's /add_external_corpus semantics, token budget
proposer     per-step drafts from corpus, siblings and the request itself; adaptive lengths
step_costs   measured cost of a drafting step vs a plain one (the batch gate's break-even)
verify_step  the verify step in the engine's pipeline (schedule, launch, settle)
verify_graphs  CUDA graphs of verify batches
acceptance   verify_drafts: exact acceptance through the engine's seeded sampler
state        SpecState, attached to the engine as `engine.spec`
"""

from rollout_accel.serving.spec.acceptance import VerifyResult, verify_drafts
from rollout_accel.serving.spec.config import SpecConfig
from rollout_accel.serving.spec.corpus import CorpusError, CorpusRegistry
from rollout_accel.serving.spec.draft_index import IndexConfig, NgramIndex, SelfIndex
from rollout_accel.serving.spec.proposer import CORPUS_FIELD, GROUP_FIELD, Proposer
from rollout_accel.serving.spec.state import SpecState, attach_spec, request_meta, spec_of

__all__ = [
    "CORPUS_FIELD",
    "GROUP_FIELD",
    "CorpusError",
    "CorpusRegistry",
    "IndexConfig",
    "NgramIndex",
    "Proposer",
    "SelfIndex",
    "SpecConfig",
    "SpecState",
    "VerifyResult",
    "attach_spec",
    "request_meta",
    "spec_of",
    "verify_drafts",
]
