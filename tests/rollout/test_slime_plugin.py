"""The slime plugin against a real engine over HTTP (our server stands in for slime's router).

slime itself is not installed here: `args` is an argparse.Namespace with the slime flags the
plugin reads, and one test data source hands out slime-shaped groups (the only stand-in).
"""

from __future__ import annotations

import inspect
import json
import sqlite3
from argparse import Namespace
from pathlib import Path
from typing import Any

import pytest

from rollout_accel.rollout import slime as plugin
from rollout_accel.rollout.sample_types import (
    RolloutFnEvalOutput,
    RolloutFnTrainOutput,
    Sample,
    Status,
)
from rollout_accel.rollout.slime_settings import (
    ACCEL_KEYS,
    SlimeSettingsError,
    load_custom_config,
    settings_from_args,
    settings_table,
)
from rollout_accel.serving.models.tokenizer import TextTokenizer
from rollout_accel.serving.server import ServerThread

N = 4
BATCH = 3
LONG, SHORT = 40, 4
PROMPTS = [f"What is {i} plus {i + 3}?" for i in range(24)]


# -- plugins named by dotted path in the args (slime signatures) ----------------------------------
async def parity_rm(args: Any, sample: Sample, **kwargs: Any) -> float:
    """A --custom-rm-path reward: 1 when the last generated token is even (mixed groups)."""
    return float(sample.tokens[-1] % 2 == 0)


def long_tail_hook(sample: Sample, payload: dict) -> dict:
    """accel_payload_hook: in every even group one sample is a straggler (LONG tokens), the
    rest stop at SHORT; ignore_eos makes lengths exact."""
    straggler = (sample.group_index or 0) % 2 == 0 and (sample.index or 0) % N == 0
    params = dict(payload["sampling_params"])
    length = LONG if straggler else SHORT
    params["max_new_tokens"] = max(
        1, min(params["max_new_tokens"], length - sample.response_length)
    )
    params["ignore_eos"] = True
    return {**payload, "sampling_params": params}


RM_PATH = f"{__name__}.parity_rm"
HOOK_PATH = f"{__name__}.long_tail_hook"


class SlimeShapedSource:
    """What slime's RolloutDataSource hands out: groups of n Samples sharing a text prompt (no
    tokens yet), with running group_index / index."""

    def __init__(self) -> None:
        self.groups = 0

    def get_samples(self, num_samples: int) -> list[list[Sample]]:
        out = []
        for _ in range(num_samples):
            g = self.groups
            prompt = PROMPTS[g % len(PROMPTS)]
            out.append(
                [
                    Sample(group_index=g, index=g * N + i, prompt=prompt, label=str(g), metadata={})
                    for i in range(N)
                ]
            )
            self.groups += 1
        return out


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    with ServerThread(model_path="tiny-qwen3", max_running_requests=128) as srv:
        yield srv


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """The preset's byte-level tokenizer saved in HF layout (AutoTokenizer loads it)."""
    path = tmp_path_factory.mktemp("tokenizer")
    TextTokenizer.byte_level(512).save(path)
    return path


@pytest.fixture(autouse=True)
def fresh_plugin():
    yield
    plugin.shutdown()


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_args(server, hf_dir, tmp_path, **overrides) -> Namespace:
    """The slime flags the plugin reads, as slime's parser would set them."""
    base = dict(
        rollout_batch_size=BATCH,
        n_samples_per_prompt=N,
        over_sampling_batch_size=BATCH,
        rollout_max_response_len=48,
        rollout_temperature=1.0,
        rollout_top_p=1.0,
        rollout_top_k=-1,
        rollout_stop=None,
        rollout_stop_token_ids=None,
        rollout_skip_special_tokens=False,
        rollout_seed=1,
        rollout_shuffle=True,
        rollout_global_dataset=True,
        partial_rollout=False,
        mask_offpolicy_in_partial_rollout=False,
        dynamic_sampling_filter_path=None,
        custom_rm_path=RM_PATH,
        reward_key=None,
        group_rm=False,
        hf_checkpoint=str(hf_dir),
        sglang_router_ip=server.host,
        sglang_router_port=server.port,
        sglang_server_concurrency=64,
        prompt_data=_jsonl(
            tmp_path / "train.jsonl",
            [{"prompt": p, "label": str(i)} for i, p in enumerate(PROMPTS)],
        ),
        input_key="prompt",
        label_key="label",
        metadata_key="metadata",
        tool_key=None,
        multimodal_keys=None,
        apply_chat_template=False,
        apply_chat_template_kwargs=None,
        rollout_max_prompt_len=None,
        dump_details=None,
        rm_type=None,
        save=str(tmp_path / "ckpt"),
        load=str(tmp_path / "ckpt"),
        eval_prompt_data=[
            "toy",
            _jsonl(tmp_path / "eval.jsonl", [{"prompt": p, "label": "1"} for p in PROMPTS[:3]]),
        ],
        n_samples_per_eval_prompt=2,
        eval_max_response_len=6,
        eval_temperature=0.0,
        accel_payload_hook=HOOK_PATH,
    )
    base.update(overrides)
    return Namespace(**base)


def _check_train_output(out, tokenizer: TextTokenizer | None = None) -> None:
    assert isinstance(out, RolloutFnTrainOutput)
    assert len(out.samples) == BATCH
    indices = [g[0].index for g in out.samples]
    assert indices == sorted(indices)
    for group in out.samples:
        assert len(group) == N
        assert len({s.metadata["prompt_key"] for s in group}) == 1
        for s in group:
            prompt_len = s.metadata["prompt_length"]
            assert s.response_length > 0
            assert len(s.tokens) == prompt_len + s.response_length
            if tokenizer is not None:
                assert s.tokens[:prompt_len] == tokenizer.encode(s.prompt)
            assert len(s.rollout_log_probs) == s.response_length
            assert len(s.loss_mask) == s.response_length
            assert s.status in (Status.COMPLETED, Status.TRUNCATED)
            assert s.reward in (0.0, 1.0)
            assert s.weight_versions and all(isinstance(v, str) for v in s.weight_versions)
    for name in ("rollout/response_len/mean", "perf/rollout_time", "accel/engines"):
        assert name in out.metrics
    assert out.metrics["accel/engines"] == 1.0


# -- rollout -------------------------------------------------------------------------------------
def test_sync_policy_two_steps_fills_slime_samples(server, hf_dir, tmp_path) -> None:
    args = make_args(server, hf_dir, tmp_path)
    source = SlimeShapedSource()
    tok = TextTokenizer.byte_level(512)
    first = plugin.generate_rollout(args, 0, source)
    second = plugin.generate_rollout(args, 1, source)
    for out in (first, second):
        _check_train_output(out, tok)
        for s in (s for g in out.samples for s in g):
            assert s.loss_mask == [1] * s.response_length
            assert len(s.weight_versions) == 1  # sync: one segment, nothing carried
    assert first.samples[-1][0].index < second.samples[0][0].index  # new prompts each step
    assert source.groups == 2 * BATCH  # sync draws exactly the batch


def test_partial_policy_carries_aborted_samples_to_next_step(server, hf_dir, tmp_path) -> None:
    args = make_args(
        server,
        hf_dir,
        tmp_path,
        partial_rollout=True,
        mask_offpolicy_in_partial_rollout=True,
        over_sampling_batch_size=2 * BATCH,
    )
    source = plugin.DataSource(args)
    first = plugin.generate_rollout(args, 0, source)
    _check_train_output(first)
    partial = [s for g in source.buffer.groups for s in g.samples if s.status == Status.ABORTED]
    assert partial and any(s.response_length > 0 for s in partial)
    assert all(s.metadata["start_rollout_id"] == 0 for s in partial if s.response_length)

    second = plugin.generate_rollout(args, 1, source)
    _check_train_output(second)
    assert second.metrics["accel/resumed_tokens"] > 0
    resumed = [s for g in second.samples for s in g if len(s.metadata["segments"]) == 2]
    assert resumed, "a group aborted in step 0 finishes in step 1"
    for s in resumed:
        old = s.metadata["segments"][0]["tokens"]
        assert s.loss_mask == [0] * old + [1] * (s.response_length - old)  # off-policy masked
        assert [seg["rollout_id"] for seg in s.metadata["segments"]] == [0, 1]
        assert len(s.weight_versions) == 2


def test_dynamic_filter_path_drops_zero_std_groups(server, hf_dir, tmp_path) -> None:
    args = make_args(
        server,
        hf_dir,
        tmp_path,
        dynamic_sampling_filter_path="rollout_accel.rollout.slime.nonzero_std_filter",
        over_sampling_batch_size=2 * BATCH,
        accel_payload_hook=None,
        rollout_max_response_len=6,
    )
    assert settings_from_args(args).controller.policy == "dynamic"
    out = plugin.generate_rollout(args, 0, SlimeShapedSource())
    assert len(out.samples) == BATCH
    for group in out.samples:
        assert len({s.reward for s in group}) == 2
    drops = {k: v for k, v in out.metrics.items() if k.startswith("rollout/dynamic_filter/drop_")}
    assert sum(drops.values()) == out.metrics["accel/filtered_groups"]


class SamePromptSource(SlimeShapedSource):
    def get_samples(self, num_samples: int) -> list[list[Sample]]:
        groups = super().get_samples(num_samples)
        for group in groups:
            for s in group:
                s.prompt = PROMPTS[0]
        return groups


def test_deterministic_inference_seeds_by_position_in_group(server, hf_dir, tmp_path) -> None:
    """slime's --sglang-enable-deterministic-inference: sampling_seed = rollout_seed + position,
    so the same prompt gives the same response at the same position of any group."""
    args = make_args(
        server,
        hf_dir,
        tmp_path,
        sglang_enable_deterministic_inference=True,
        accel_payload_hook=None,
        rollout_max_response_len=8,
    )
    out = plugin.generate_rollout(args, 0, SamePromptSource())
    by_position = [{tuple(g[i].tokens) for g in out.samples} for i in range(N)]
    assert all(len(responses) == 1 for responses in by_position)
    assert len(set().union(*by_position)) > 1  # positions differ from each other


def test_evaluation_output_shape(server, hf_dir, tmp_path) -> None:
    args = make_args(server, hf_dir, tmp_path)
    out = plugin.generate_rollout(args, 5, SlimeShapedSource(), evaluation=True)
    assert isinstance(out, RolloutFnEvalOutput)
    assert set(out.data) == {"toy"}
    toy = out.data["toy"]
    assert set(toy) >= {"rewards", "truncated", "samples"}
    assert len(toy["rewards"]) == len(toy["truncated"]) == len(toy["samples"]) == 3 * 2
    assert [s.index for s in toy["samples"]] == list(range(6))
    for s in toy["samples"]:
        assert s.status in (Status.COMPLETED, Status.TRUNCATED)
        assert 0 < s.response_length <= 6
    assert toy["rewards"] == [s.reward for s in toy["samples"]]
    assert toy["truncated"] == [s.status == Status.TRUNCATED for s in toy["samples"]]
    assert out.metrics["accel/eval/toy/rollout_time"] > 0


def test_history_policy_checkpoints_history(server, hf_dir, tmp_path) -> None:
    args = make_args(server, hf_dir, tmp_path, accel_policy="history", accel_payload_hook=None)
    args.rollout_max_response_len = 6
    source = plugin.DataSource(args)
    out = plugin.generate_rollout(args, 0, source)
    assert len(out.samples) == BATCH
    source.save(0)
    snapshot = Path(args.save) / "rollout" / "history_0.db"
    assert snapshot.is_file()
    with sqlite3.connect(snapshot) as conn:
        recorded = conn.execute("SELECT COUNT(*) FROM groups").fetchone()[0]
    assert recorded >= BATCH

    plugin.shutdown()
    live = Path(args.save) / "rollout" / "accel_history.db"
    live.unlink()  # a fresh run: the live history is gone, the snapshot restores it
    restored = plugin.DataSource(args)
    restored.load(0)
    with sqlite3.connect(live) as conn:
        assert conn.execute("SELECT COUNT(*) FROM groups").fetchone()[0] == recorded


# -- the data source -------------------------------------------------------------------------------
def test_data_source_save_load_round_trip(server, hf_dir, tmp_path) -> None:
    args = make_args(server, hf_dir, tmp_path)
    source = plugin.DataSource(args)
    assert len(source) == len(PROMPTS)
    drawn = source.get_samples(3)
    assert [len(g) for g in drawn] == [N] * 3
    assert [s.index for s in drawn[0]] == list(range(N))
    partial, untouched, deferred = drawn
    for s in partial:  # as the controller leaves an aborted group
        s.tokens = [5, 6, 7, 100 + s.index]
        s.response_length, s.rollout_log_probs, s.loss_mask = 1, [-0.5], [1]
        s.status = Status.ABORTED
        s.metadata["start_rollout_id"] = 2
    source.add_samples([partial, untouched])
    source.give_back([deferred])
    with pytest.raises(ValueError, match="n_samples_per_prompt=4"):
        source.add_samples([partial[:2]])
    source.save(3)

    restored = plugin.DataSource(args)
    restored.load(3)
    assert [g.key for g in restored.buffer.groups] == [g.key for g in source.buffer.groups]
    assert restored.buffer.groups[0].prompt_ids == [5, 6, 7]
    assert [s.tokens for s in restored.buffer.groups[0].samples] == [s.tokens for s in partial]
    assert restored.buffer.groups[0].samples[0].status == Status.ABORTED
    assert [[s.index for s in g] for g in restored.returned] == [
        [s.index for s in g] for g in source.returned
    ]
    # the prompt stream continues where it was saved (offset, epoch, indices)
    ahead = source.take_fresh(4)
    again = restored.take_fresh(4)
    assert [(g[0].index, g[0].prompt) for g in again] == [(g[0].index, g[0].prompt) for g in ahead]
    # slime's semantics: get_samples serves buffered partial groups first
    first = restored.get_samples(1)[0]
    assert first[0].status == Status.ABORTED and len(restored.buffer) == 0


# -- settings --------------------------------------------------------------------------------------
def _flags(**overrides) -> Namespace:
    base = dict(
        rollout_batch_size=32,
        n_samples_per_prompt=8,
        rollout_max_response_len=1024,
        rollout_temperature=0.8,
        rollout_top_p=1.0,
        rollout_top_k=20,
        rollout_stop=["</answer>"],
        rollout_stop_token_ids=None,
        over_sampling_batch_size=32,
        partial_rollout=False,
        mask_offpolicy_in_partial_rollout=False,
        sglang_router_ip="10.0.0.1",
        sglang_router_port=3000,
        sglang_server_concurrency=256,
        rollout_seed=7,
        reward_key="acc",
    )
    base.update(overrides)
    return Namespace(**base)


def test_settings_default_from_slime_flags() -> None:
    s = settings_from_args(_flags())
    c = s.controller
    assert (c.policy, c.rollout_batch_size, c.n_samples_per_prompt) == ("sync", 32, 8)
    assert c.sampling_params["max_new_tokens"] == 1024
    assert c.sampling_params["temperature"] == 0.8 and c.sampling_params["top_k"] == 20
    assert c.sampling_params["stop"] == ["</answer>"] and "stop_token_ids" not in c.sampling_params
    assert c.sampling_params["no_stop_trim"] is True
    assert (c.reward_key, c.seed) == ("acc", 7)
    assert s.router_url == "http://10.0.0.1:3000" and s.concurrency == 256
    assert s.planner is None

    p = settings_from_args(
        _flags(
            partial_rollout=True,
            mask_offpolicy_in_partial_rollout=True,
            over_sampling_batch_size=64,
        )
    ).controller
    assert (p.policy, p.over_sampling, p.mask_offpolicy) == ("partial", 2.0, True)
    assert settings_from_args(_flags(partial_rollout=True)).controller.over_sampling == 1.5

    h = settings_from_args(
        _flags(accel_policy="history", accel_skip=False, accel_max_staleness=3, accel_seed=None)
    )
    assert h.controller.policy == "history" and h.controller.max_staleness == 3
    assert h.controller.seed == 7  # null means "default"
    assert h.planner.skip is False and h.planner.allocator.fixed_n == 8


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (
            {"accel_polcy": "sync"},
            "accel_polcy: unknown rollout_accel setting; did you mean 'accel_policy'",
        ),
        ({"accel_policy": "fast"}, "accel_policy: 'fast' is not one of"),
        ({"accel_over_sampling": 0.5}, "accel_over_sampling: must be a number >= 1.0"),
        ({"accel_max_staleness": -1}, "accel_max_staleness: must be an integer >= 0"),
        ({"accel_stale_action": "keep"}, "accel_stale_action: 'keep' is not one of"),
        ({"accel_skip": "yes"}, "accel_skip: must be true or false"),
        ({"accel_engine_urls": ["localhost:1"]}, "accel_engine_urls: 'localhost:1' is not an http"),
        ({"rollout_max_response_len": None}, "--rollout-max-response-len: must be set"),
        ({"rollout_batch_size": 0}, "--rollout-batch-size: must be a positive integer"),
        ({"group_rm": True}, "--group-rm: not supported"),
        ({"rollout_top_p": 0.9}, "--rollout-top-p: 0.9 needs top-p token replay"),
        ({"sglang_router_ip": None}, "--sglang-router-ip/--sglang-router-port: not set"),
    ],
)
def test_bad_settings_name_the_key(overrides, named) -> None:
    with pytest.raises(SlimeSettingsError) as err:
        settings_from_args(_flags(**overrides))
    assert named in str(err.value)


def test_custom_config_yaml_is_checked(tmp_path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("accel_policy: history\naccel_over_sampling: 2\nother_plugin_key: 1\n")
    assert load_custom_config(good)["accel_policy"] == "history"
    bad = tmp_path / "bad.yaml"
    bad.write_text("accel_max_stalenes: 2\n")
    with pytest.raises(
        SlimeSettingsError, match="accel_max_stalenes: unknown .*'accel_max_staleness'"
    ):
        load_custom_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- accel_policy\n")
    with pytest.raises(SlimeSettingsError, match="top level must be a mapping"):
        load_custom_config(listed)
    broken = tmp_path / "broken.yaml"
    broken.write_text("accel_policy: [sync\n")
    with pytest.raises(SlimeSettingsError, match="not valid YAML"):
        load_custom_config(broken)


def test_generate_rollout_rejects_bad_settings_before_any_request(tmp_path) -> None:
    args = _flags(accel_policy="history", accel_target_effective_share=2.0)
    with pytest.raises(
        SlimeSettingsError, match="accel_target_effective_share: must be a number in"
    ):
        plugin.generate_rollout(args, 0, SlimeShapedSource())
    with pytest.raises(
        SlimeSettingsError, match="args: rollout_accel needs slime's parsed arguments"
    ):
        plugin.generate_rollout(None, 0, SlimeShapedSource())


def test_settings_table_lists_every_key() -> None:
    table = settings_table()
    assert all(f"`{key.name}`" in table for key in ACCEL_KEYS)
    assert len(table.splitlines()) == len(ACCEL_KEYS) + 2


# -- the signatures slime calls ----------------------------------------------------------------------
def test_signatures_match_what_slime_calls() -> None:
    sig = inspect.signature(plugin.generate_rollout)
    assert tuple(sig.parameters) == ("args", "rollout_id", "data_source", "evaluation")
    assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in sig.parameters.values())
    assert sig.parameters["evaluation"].default is False

    assert tuple(inspect.signature(plugin.DataSource.__init__).parameters) == ("self", "args")
    methods = {
        "get_samples": ("self", "num_samples"),
        "add_samples": ("self", "samples"),
        "save": ("self", "rollout_id"),
        "load": ("self", "rollout_id"),
        "__len__": ("self",),
    }
    for name, params in methods.items():
        assert tuple(inspect.signature(getattr(plugin.DataSource, name)).parameters) == params
    assert inspect.signature(plugin.DataSource.load).parameters["rollout_id"].default is None

    params = inspect.signature(plugin.nonzero_std_filter).parameters
    assert tuple(params)[:2] == ("args", "samples")
    assert any(p.kind == p.VAR_KEYWORD for p in params.values())


def test_nonzero_std_filter_keeps_mixed_groups() -> None:
    def group(*rewards):
        return [Sample(reward=r) for r in rewards]

    args = Namespace(reward_key=None)
    assert plugin.nonzero_std_filter(args, group(0.0, 1.0, 1.0)).keep
    out = plugin.nonzero_std_filter(args, group(1.0, 1.0))
    assert not out.keep and out.reason == "zero_std_1.0"
    keyed = plugin.nonzero_std_filter(
        Namespace(reward_key="acc"), [Sample(reward={"acc": 0.0}), Sample(reward={"acc": 1.0})]
    )
    assert keyed.keep


def test_policy_v2_settings_reach_the_controller() -> None:
    c = settings_from_args(
        _flags(accel_policy="history", accel_tail_budget=2, accel_drafts=True)
    ).controller
    assert (c.tail_budget, c.drafts, c.finishes_stale, c.batches_tail) == (2.0, True, True, True)
    assert settings_from_args(_flags()).controller.tail_budget is None
    with pytest.raises(SlimeSettingsError, match="accel_tail_budget: must be a number >= 1"):
        settings_from_args(_flags(accel_tail_budget=0.5))
