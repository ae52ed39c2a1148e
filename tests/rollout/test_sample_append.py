"""The slime seam: engine answers go onto a Sample through `Sample.append_response_tokens`.

The same cases, written from slime's `slime/utils/types.py` (THUDM/slime, the method's rules),
run against our fallback `Sample` and, where slime is installed, against slime's own class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from rollout_accel.rollout.sample_append import append_output, engine_tokens
from rollout_accel.rollout.sample_types import SLIME_AVAILABLE
from rollout_accel.rollout.sample_types import Sample as FallbackSample


def _classes() -> list:
    classes = [pytest.param(FallbackSample, id="fallback")]
    try:  # slime's own class, where slime is installed
        from slime.utils.types import Sample as SlimeSample

        classes.append(pytest.param(SlimeSample, id="slime"))
    except ImportError:
        classes.append(
            pytest.param(None, id="slime", marks=pytest.mark.skip(reason="slime not installed"))
        )
    return classes


def _meta(kind: str = "stop", **extra) -> dict:
    return {"finish_reason": {"type": kind}, "prompt_tokens": 3, "cached_tokens": 2, **extra}


@pytest.fixture(params=_classes())
def cls(request):
    return request.param


def test_trainable_tokens_keep_mask_and_logprobs_aligned(cls) -> None:
    s = cls(tokens=[1, 2, 3])
    s.append_response_tokens(
        None, tokens=[7, 8], log_probs=[-0.5, -0.25], meta_info=_meta("abort", weight_version="3"),
        text="ab",
    )  # fmt: skip
    assert s.tokens == [1, 2, 3, 7, 8] and s.response_length == 2 and s.response == "ab"
    assert s.loss_mask == [1, 1] and s.rollout_log_probs == [-0.5, -0.25]
    assert s.status == cls.Status.ABORTED and s.weight_versions == ["3"]
    assert (s.prefix_cache_info.cached_tokens, s.prefix_cache_info.total_prompt_tokens) == (2, 3)
    s.append_response_tokens(
        None, tokens=[9], log_probs=[-1.0], meta_info=_meta("length"), text="c"
    )
    assert s.response_length == 3 and s.loss_mask == [1, 1, 1] and s.response == "abc"
    assert s.rollout_log_probs == [-0.5, -0.25, -1.0] and s.status == cls.Status.TRUNCATED
    assert s.weight_versions == ["3"]  # no weight_version in this answer: nothing appended
    assert s.prefix_cache_info.total_prompt_tokens == 6


def test_masked_prefix_and_non_trainable_tokens(cls) -> None:
    s = cls(tokens=[1])
    s.append_response_tokens(None, tokens=[5, 6], log_probs=[-1.0, -2.0])
    s.loss_mask = [0, 0]  # the controller masks an off-policy prefix
    s.append_response_tokens(None, tokens=[4], log_probs=[-3.0], meta_info=_meta())
    assert s.loss_mask == [0, 0, 1] and s.status == cls.Status.COMPLETED
    s.append_response_tokens(None, tokens=[2, 2], trainable=False)
    assert s.loss_mask == [0, 0, 1, 0, 0] and s.rollout_log_probs[-2:] == [0.0, 0.0]


def test_length_and_logprob_errors(cls) -> None:
    s = cls(tokens=[1])
    with pytest.raises(ValueError, match="log_probs length"):
        s.append_response_tokens(None, tokens=[5, 6], log_probs=[-1.0])
    with pytest.raises(ValueError, match="require rollout log probabilities"):
        s.append_response_tokens(None, tokens=[5])
    with pytest.raises(ValueError, match="should not pass rollout log probabilities"):
        s.append_response_tokens(None, tokens=[5], log_probs=[-1.0], trainable=False)
    old = cls(tokens=[1, 5], response_length=1)  # a response without logprobs so far
    with pytest.raises(ValueError, match="no existing rollout_log_probs"):
        old.append_response_tokens(None, tokens=[6], log_probs=[-1.0])


def test_spec_stats_only_with_speculative_decoding(cls) -> None:
    meta = _meta(spec_accept_token_num=3, spec_draft_token_num=4, spec_verify_ct=2)
    meta["completion_tokens"] = 1
    off, on = cls(tokens=[1]), cls(tokens=[1])
    off.append_response_tokens(None, tokens=[2], log_probs=[-1.0], meta_info=meta)
    on.append_response_tokens(
        SimpleNamespace(sglang_speculative_algorithm="NGRAM"),
        tokens=[2],
        log_probs=[-1.0],
        meta_info=meta,
    )
    assert off.spec_info.spec_draft_token_num == 0
    assert on.spec_info.spec_draft_token_num == 4 and on.spec_info.spec_verify_ct == 2


def test_unknown_finish_reason_leaves_status(cls) -> None:
    s = cls(tokens=[1])
    s.append_response_tokens(None, tokens=[2], log_probs=[-1.0], meta_info=_meta("weird"))
    assert s.status == cls.Status.PENDING


def _answer(tokens: list[int], kind: str = "stop") -> dict:
    meta = _meta(kind, weight_version="v1")
    meta["output_token_logprobs"] = [[-0.1 * t, t, None] for t in tokens]
    return {"text": "xy", "output_ids": tokens, "meta_info": meta}


def test_append_output_uses_the_samples_own_method() -> None:
    calls = []

    @dataclass
    class Recording(FallbackSample):
        def append_response_tokens(self, args=None, **kw):  # stands in for slime's
            calls.append((args, kw))

    s = Recording(tokens=[1])
    marker = SimpleNamespace(sglang_speculative_algorithm=None)
    assert append_output(s, _answer([4, 5]), marker) == 2
    (args, kw), = calls  # fmt: skip
    assert args is marker and kw["tokens"] == [4, 5] and kw["text"] == "xy"
    assert kw["log_probs"] == pytest.approx([-0.4, -0.5])
    assert kw["meta_info"]["finish_reason"] == {"type": "stop"}


def test_append_output_on_a_slime_without_the_method() -> None:
    """Older slime: its Sample has `update_from_meta_info(args, meta)` (status, versions, stats),
    not `append_response_tokens`; the seam appends the tokens and calls that."""

    @dataclass
    class OldSlimeSample:
        tokens: list = field(default_factory=list)
        response: str = ""
        response_length: int = 0
        loss_mask: list | None = None
        rollout_log_probs: list | None = None
        seen: list = field(default_factory=list)

        def update_from_meta_info(self, args, meta_info):
            assert args.sglang_speculative_algorithm is None  # read unconditionally by slime
            self.seen.append(meta_info["finish_reason"]["type"])

    s = OldSlimeSample(tokens=[1])
    append_output(s, _answer([4, 5], "length"))
    assert s.tokens == [1, 4, 5] and s.loss_mask == [1, 1] and s.response == "xy"
    assert s.rollout_log_probs == pytest.approx([-0.4, -0.5]) and s.seen == ["length"]
    with pytest.raises(ValueError, match="log probabilities"):
        append_output(s, {"output_ids": [3], "meta_info": _meta()})


def test_engine_tokens_shapes() -> None:
    assert engine_tokens(_answer([4])) == ([4], [pytest.approx(-0.4)])
    assert engine_tokens({"output_ids": [], "meta_info": _meta()}) == ([], [])
    assert engine_tokens({"output_ids": [3], "meta_info": _meta()}) == ([3], None)
    assert SLIME_AVAILABLE in (True, False)
