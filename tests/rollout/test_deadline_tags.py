"""The controller-side tag for requests that will be aborted at the step's target anyway."""

from __future__ import annotations

import pytest

from rollout_accel.rollout.deadline_tags import LOW_PRIORITY, AbortRiskTagger


def test_tags_long_requests_late_in_the_step_only() -> None:
    tagger = AbortRiskTagger(target_groups=10, decode_tokens_per_s=100.0, late_fraction=0.5)
    tagger.start_step(now=0.0)
    payload = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 4000}}
    # Early in the step nothing is tagged: the acceptance rate says little yet.
    tagger.group_accepted(2)
    assert tagger.tag(payload, 4000, now=2.0) is payload
    # 6 of 10 accepted after 6 s: 4 left at 1 group/s -> about 4 s left in the step.
    tagger.group_accepted(4)
    assert tagger.time_left(now=6.0) == pytest.approx(4.0)
    tagged = tagger.tag(payload, 1000, now=6.0)  # 10 s of decode > 4 s left
    assert tagged["priority"] == LOW_PRIORITY and "priority" not in payload
    assert tagger.tag(payload, 200, now=6.0) is payload  # 2 s: finishes in time
    assert tagger.tag({**payload, "priority": 3}, 1000, now=6.0)["priority"] == 3
    assert tagger.tag(payload, None, now=6.0) is payload
    assert tagger.tagged == 1


def test_payload_hook_and_bad_settings() -> None:
    tagger = AbortRiskTagger(target_groups=2, decode_tokens_per_s=10.0, late_fraction=0.0)
    tagger.start_step()
    tagger.group_accepted()
    hook = tagger.payload_hook(lambda sample: sample["expected"])
    out = hook({"expected": 10_000}, {"input_ids": [1]})
    assert out["priority"] == LOW_PRIORITY
    with pytest.raises(ValueError, match="low_priority"):
        AbortRiskTagger(target_groups=2, low_priority=1)
    with pytest.raises(ValueError, match="target_groups"):
        AbortRiskTagger(target_groups=0)
