"""slime's evaluation through the plugin: eval data sets from `--eval-prompt-data` /
`--eval-config`, their sampling parameters, and the runtime's `evaluate` (every eval prompt x n
samples, sync, no filter; rewards as slime logs them).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from rollout_accel.rollout.controller import RolloutController
from rollout_accel.rollout.controller_config import ControllerConfig
from rollout_accel.rollout.prompts import ListPromptSource, PromptItem
from rollout_accel.rollout.rewards import load_reward
from rollout_accel.rollout.sample_types import (
    SLIME_AVAILABLE,
    RolloutFnEvalOutput,
    Sample,
    Status,
)
from rollout_accel.rollout.slime.data_source import (
    _prompt_ids,
    _prompt_sample,
    _read_rows,
    _tokenizer,
)
from rollout_accel.rollout.slime_settings import SlimeSettingsError

Group = list[Sample]


# -- evaluation data -----------------------------------------------------------------------------
@dataclass
class _EvalSet:
    name: str
    prompts: list[Sample]
    n: int
    sampling_params: dict[str, Any]
    custom_rm_path: str | None
    rm_type: str | None


def _pick(cfg: Any, field_name: str, args: Any, *arg_names: str, default: Any = None) -> Any:
    value = getattr(cfg, field_name, None) if cfg is not None else None
    for name in arg_names:
        if value is not None:
            break
        value = getattr(args, name, None)
    return default if value is None else value


def _eval_configs(args: Any) -> list[Any]:
    """slime's resolved `args.eval_datasets`, or (name, path) pairs of --eval-prompt-data."""
    datasets = getattr(args, "eval_datasets", None)
    if datasets:
        return list(datasets)
    pairs = list(getattr(args, "eval_prompt_data", None) or [])
    if len(pairs) == 1:
        pairs = ["aime", pairs[0]]  # slime's legacy single-path form
    if len(pairs) % 2:
        raise SlimeSettingsError("--eval-prompt-data: expected name/path pairs")
    return [_NamedPath(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)]


@dataclass
class _NamedPath:
    name: str
    path: str


def _load_eval_prompts(args: Any, cfg: Any) -> list[Sample]:
    input_key = _pick(cfg, "input_key", args, "eval_input_key", "input_key", default="text")
    label_key = _pick(cfg, "label_key", args, "eval_label_key", "label_key")
    metadata_key = _pick(cfg, "metadata_key", args, "metadata_key", default="metadata")
    chat = bool(_pick(cfg, "apply_chat_template", args, "apply_chat_template", default=False))
    if SLIME_AVAILABLE:  # pragma: no cover - needs slime
        from slime.utils.data import Dataset

        tokenizer = _tokenizer(str(args.hf_checkpoint))
        dataset = Dataset(
            cfg.path,
            tokenizer=tokenizer,
            processor=None,
            max_length=getattr(args, "eval_max_prompt_len", None),
            prompt_key=input_key,
            label_key=label_key,
            metadata_key=metadata_key,
            apply_chat_template=chat,
            apply_chat_template_kwargs=_pick(
                cfg, "apply_chat_template_kwargs", args, "apply_chat_template_kwargs"
            ),
        )
        return list(dataset.samples)
    return [
        _prompt_sample(args, row, input_key, label_key, metadata_key, chat)
        for row in _read_rows(cfg.path)
    ]


def _eval_sampling_params(args: Any, cfg: Any) -> dict[str, Any]:
    """slime's eval parameters: dataset value, else --eval-*, else --rollout-*."""
    max_len = _pick(
        cfg, "max_response_len", args, "eval_max_response_len", "rollout_max_response_len"
    )
    if not isinstance(max_len, int) or max_len < 1:
        raise SlimeSettingsError(
            f"--eval-max-response-len: must be a positive integer, got {max_len!r}"
        )
    params = {
        "temperature": _pick(
            cfg, "temperature", args, "eval_temperature", "rollout_temperature", default=1.0
        ),
        "top_p": _pick(cfg, "top_p", args, "eval_top_p", "rollout_top_p", default=1.0),
        "top_k": _pick(cfg, "top_k", args, "eval_top_k", "rollout_top_k", default=-1),
        "max_new_tokens": max_len,
        "stop": _pick(cfg, "stop", args, "rollout_stop"),
        "stop_token_ids": _pick(cfg, "stop_token_ids", args, "rollout_stop_token_ids"),
        "skip_special_tokens": bool(
            _pick(cfg, "skip_special_tokens", args, "rollout_skip_special_tokens", default=False)
        ),
        "no_stop_trim": bool(_pick(cfg, "no_stop_trim", args, default=True)),
        "spaces_between_special_tokens": False,
        "min_new_tokens": _pick(cfg, "min_new_tokens", args, "eval_min_new_tokens"),
        "repetition_penalty": _pick(cfg, "repetition_penalty", args),
    }
    return {k: v for k, v in params.items() if v is not None}


class EvaluationMixin:
    """The runtime's evaluation methods (mixed into `_Runtime`, whose state they use)."""

    async def evaluate(self, rollout_id: int) -> RolloutFnEvalOutput:
        """slime's eval: every eval prompt x n samples, sync, no filter; rewards as slime logs them."""
        await self.refresh_engines()
        data: dict[str, dict[str, Any]] = {}
        metrics: dict[str, float] = {}
        for cfg in _eval_configs(self.args):
            eval_set = self._eval_set(cfg)
            if not eval_set.prompts:
                continue
            samples, step_metrics = await self._eval_one(eval_set, rollout_id)
            key = getattr(self.args, "eval_reward_key", None) or getattr(
                self.args, "reward_key", None
            )
            data[eval_set.name] = {
                "rewards": [s.reward[key] if key else s.reward for s in samples],
                "truncated": [s.status == Status.TRUNCATED for s in samples],
                "samples": samples,
            }
            for name in (
                "perf/rollout_time",
                "accel/generated_tokens",
                "accel/generated_tokens_per_s",
            ):
                if name in step_metrics:
                    metrics[f"accel/eval/{eval_set.name}/{name.split('/', 1)[1]}"] = step_metrics[
                        name
                    ]
        if not data:
            raise SlimeSettingsError(
                "evaluation: no eval prompts (set --eval-prompt-data or --eval-config)"
            )
        return RolloutFnEvalOutput(data=data, metrics=metrics)

    def _eval_set(self, cfg: Any) -> _EvalSet:
        cache_key = (cfg.name, cfg.path)
        if cache_key not in self._eval_cache:
            self._eval_cache[cache_key] = _load_eval_prompts(self.args, cfg)
        n = int(
            _pick(
                cfg, "n_samples_per_eval_prompt", self.args, "n_samples_per_eval_prompt", default=1
            )
        )
        return _EvalSet(
            cfg.name,
            self._eval_cache[cache_key],
            n,
            _eval_sampling_params(self.args, cfg),
            getattr(cfg, "custom_rm_path", None),
            getattr(cfg, "rm_type", None),
        )

    async def _eval_one(
        self, eval_set: _EvalSet, rollout_id: int
    ) -> tuple[list[Sample], dict[str, float]]:
        items: list[PromptItem] = []
        index = 0
        for prompt_index, prompt in enumerate(eval_set.prompts):
            group = []
            for _ in range(eval_set.n):
                sample = copy.deepcopy(prompt)
                sample.group_index, sample.index = prompt_index, index
                index += 1
                if eval_set.rm_type is not None:
                    sample.metadata = {**(sample.metadata or {}), "rm_type": eval_set.rm_type}
                if eval_set.custom_rm_path:
                    sample.custom_rm_path = eval_set.custom_rm_path
                group.append(sample)
            ids = _prompt_ids(self.args, group)
            items.append(
                PromptItem(
                    f"eval-{eval_set.name}-{prompt_index}",
                    ids,
                    prompt.label,
                    None,
                    {"samples": group},
                )
            )
        config = ControllerConfig(
            policy="sync",
            rollout_batch_size=len(items),
            n_samples_per_prompt=eval_set.n,
            dynamic_filter=False,
            sampling_params=eval_set.sampling_params,
            reward_key=getattr(self.args, "eval_reward_key", None)
            or getattr(self.args, "reward_key", None),
        )

        def hook(sample: Sample, payload: dict[str, Any]) -> dict[str, Any]:
            payload = self._hook(sample, payload, eval_set.n)
            payload["rid"] = f"eval-{eval_set.name}-{payload['rid']}"  # never clashes with training
            return payload

        controller = RolloutController(
            self.pool,
            ListPromptSource(items, shuffle=False),
            self._eval_reward,
            config,
            payload_hook=hook,
        )
        out = await controller.step(rollout_id)
        samples = sorted((s for g in out.groups for s in g), key=lambda s: s.index)
        return samples, out.metrics

    async def _eval_reward(self, sample: Sample) -> Any:
        path = getattr(sample, "custom_rm_path", None)
        if path and not SLIME_AVAILABLE and not self.settings.reward:
            if path not in self._eval_rewards:
                self._eval_rewards[path] = load_reward(path, self.args)
            return await self._eval_rewards[path](sample)
        return await self.reward(sample)
