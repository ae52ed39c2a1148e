"""Settings of the slime plugin: slime's own flags plus our `accel_*` keys, mapped and checked.

slime copies every top-level key of the `--custom-config-path` YAML onto its `args` namespace;
ours all start with `accel_`. `settings_from_args(args)` reads both and builds the controller's
and planner's configs. Invariants:

- every `accel_*` attribute on `args` is a key of `ACCEL_KEYS` (a typo is an error, never
  silently ignored), and every error names the key or slime flag at fault;
- `null` in the YAML means "the default" for every key;
- slime flags give the defaults (batch size, n, sampling parameters, partial rollout, masking,
  over-sampling, reward key, seed), so a recipe that sets no `accel_*` key behaves like slime's
  own rollout with the same flags.

`settings_table()` renders ACCEL_KEYS as the Markdown table in recipes/slime/README.md.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rollout_accel.rollout.controller_config import (
    POLICIES,
    ControllerConfig,
    ControllerConfigError,
)
from rollout_accel.sampling import (
    AllocatorConfig,
    InvalidConfigError,
    LengthConfig,
    PlannerConfig,
    SelectorConfig,
)

PREFIX = "accel_"
DEFAULT_OVER_SAMPLING = 1.5  # used by over-provisioning policies when slime's ratio is 1


class SlimeSettingsError(ValueError):
    """A plugin setting (an `accel_*` key or a slime flag) that cannot work; names the key."""


Check = Callable[[str, Any], Any]


@dataclass(frozen=True, slots=True)
class AccelKey:
    """One `accel_*` key: its type and default in words, what it does, and its checker."""

    name: str
    kind: str
    default: str
    doc: str
    check: Check


# -- checkers: return the normalised value or raise naming the key ---------------------------
def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SlimeSettingsError(f"{key}: must be true or false, got {value!r}")
    return value


def _int(minimum: int) -> Check:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise SlimeSettingsError(f"{key}: must be an integer >= {minimum}, got {value!r}")
        return value

    return check


def _float(low: float, high: float = math.inf, high_open: bool = False) -> Check:
    def check(key: str, value: Any) -> float:
        ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
        ok = ok and low <= value and (value < high if high_open else value <= high)
        if not ok:
            bound = (
                f"in [{low}, {high}{')' if high_open else ']'}" if high != math.inf else f">= {low}"
            )
            raise SlimeSettingsError(f"{key}: must be a number {bound}, got {value!r}")
        return float(value)

    return check


def _choice(*options: str) -> Check:
    def check(key: str, value: Any) -> str:
        if value not in options:
            raise SlimeSettingsError(f"{key}: {value!r} is not one of {list(options)}")
        return value

    return check


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SlimeSettingsError(f"{key}: must be a non-empty string, got {value!r}")
    return value


def _dotted(key: str, value: Any) -> str:
    value = _text(key, value)
    if "." not in value:
        raise SlimeSettingsError(f"{key}: {value!r} is not a dotted path like pkg.module.fn")
    return value


def _urls(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not value:
        raise SlimeSettingsError(f"{key}: must be a non-empty list of URLs, got {value!r}")
    for url in value:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise SlimeSettingsError(f"{key}: {url!r} is not an http(s) URL")
    return tuple(value)


ACCEL_KEYS: tuple[AccelKey, ...] = (
    AccelKey(
        "accel_policy",
        " / ".join(f"`{p}`" for p in POLICIES),
        "`partial` with --partial-rollout, else `dynamic` with --dynamic-sampling-filter-path, else `sync`",
        "Rollout policy. sync: every dispatched group completes (slime's default). dynamic: DAPO "
        "over-sampling, zero-variance groups dropped and refilled. partial: APRIL, over-provision, "
        "abort at target, resume the partial samples next step. history: history-informed prompt "
        "selection + longest-first dispatch + partial rollout.",
        _choice(*POLICIES),
    ),
    AccelKey(
        "accel_over_sampling",
        "float >= 1",
        "--over-sampling-batch-size / --rollout-batch-size when > 1, else 1.5",
        "Groups kept in flight = ceil(rollout_batch_size * this) until the target is reached. "
        "Ignored by `sync`.",
        _float(1.0),
    ),
    AccelKey(
        "accel_dynamic_filter",
        "bool",
        "on for dynamic or when --dynamic-sampling-filter-path is set, else off",
        "Drop groups the filter rejects (the --dynamic-sampling-filter-path function, or "
        "non-zero reward std) and refill. false turns it off even if the slime flag is set.",
        _bool,
    ),
    AccelKey(
        "accel_tail_budget",
        "float >= 1",
        "off",
        "The max-of-n tail: once 3/4 of a group is done, its other samples may run at most this "
        "many times the longest finished sibling; a cut sample counts as truncated (slime's "
        "handling of a length finish). A speed-for-accuracy trade; history then also finishes "
        "stragglers that would break accel_max_staleness instead of dropping them.",
        _float(1.0),
    ),
    AccelKey(
        "accel_drafts",
        "bool",
        "false",
        "Attach each prompt's corpus key to its requests (sampling_params.custom_params.corpus_id) "
        "for speculative decoding from history drafts; needs engines that do speculative decoding.",
        _bool,
    ),
    AccelKey(
        "accel_max_staleness",
        "int >= 0",
        "1",
        "A buffered partial group older than this many rollout steps is dropped or restarted.",
        _int(0),
    ),
    AccelKey(
        "accel_stale_action",
        "`drop` / `restart`",
        "`drop`",
        "What happens to a group past accel_max_staleness: discarded, or regenerated from its prompt.",
        _choice("drop", "restart"),
    ),
    AccelKey(
        "accel_mask_offpolicy",
        "bool",
        "--mask-offpolicy-in-partial-rollout",
        "Zero the loss mask of tokens generated under an earlier policy (resumed samples).",
        _bool,
    ),
    AccelKey(
        "accel_keep_surplus",
        "bool",
        "true",
        "partial/history: keep finished groups beyond the target for the next step instead of "
        "discarding them.",
        _bool,
    ),
    AccelKey(
        "accel_max_candidates_factor",
        "float >= 1",
        "8.0",
        "history: at most this many x the needed prompts are considered per refill.",
        _float(1.0),
    ),
    AccelKey(
        "accel_history_path",
        "path",
        "`<save>/rollout/accel_history.db` (--save), else a temporary file",
        "The live per-prompt history (SQLite). Snapshots go next to slime's data-source state "
        "(`<save>/rollout/history_<rollout_id>.db`).",
        _text,
    ),
    AccelKey(
        "accel_skip",
        "bool",
        "true",
        "history: skip prompts likely to give a zero-variance group (false: keep every prompt, "
        "still order longest-first).",
        _bool,
    ),
    AccelKey(
        "accel_target_effective_share",
        "float in [0, 1]",
        "0.75",
        "history: the selector explores less while fewer than this share of groups are mixed.",
        _float(0.0, 1.0),
    ),
    AccelKey(
        "accel_max_consecutive_skips",
        "int >= 0",
        "3",
        "history: a prompt skipped this often in a row is rolled out anyway (the bound grows "
        "with its zero-variance streak).",
        _int(0),
    ),
    AccelKey(
        "accel_length_quantile",
        "float in [0.5, 1)",
        "0.9",
        "history: dispatch order is by this quantile of the predicted response length.",
        _float(0.5, 1.0, high_open=True),
    ),
    AccelKey(
        "accel_record_responses",
        "bool",
        "false",
        "Store response token ids in the history (corpus for speculative drafts).",
        _bool,
    ),
    AccelKey(
        "accel_seed",
        "int >= 0",
        "--rollout-seed",
        "Seed of the planner's random draws.",
        _int(0),
    ),
    AccelKey(
        "accel_reward",
        "builtin name or dotted path",
        "slime's reward (--custom-rm-path / --rm-type)",
        "Override the reward: `numeric`, `exact_match`, or `pkg.module.fn` (slime's "
        "`async rm(args, sample)` signature or `async fn(sample)`).",
        _text,
    ),
    AccelKey(
        "accel_payload_hook",
        "dotted path",
        "none",
        "`fn(sample, payload) -> payload`, applied to every /generate request (e.g. extra "
        "sampling params per sample, or workload simulation in benchmarks).",
        _dotted,
    ),
    AccelKey(
        "accel_engine_urls",
        "list of URLs",
        "the workers behind slime's router (--sglang-router-ip/--sglang-router-port)",
        "SGLang-protocol servers to use directly instead of asking the router.",
        _urls,
    ),
)
KEYS_BY_NAME: dict[str, AccelKey] = {k.name: k for k in ACCEL_KEYS}


@dataclass(frozen=True, slots=True)
class SlimeSettings:
    """Everything the plugin needs, resolved: configs, paths, engines, hooks."""

    controller: ControllerConfig
    planner: PlannerConfig | None
    history_path: str | None  # None: the plugin picks a temporary file
    reward: str | None
    payload_hook: str | None
    dynamic_filter_path: str | None
    engine_urls: tuple[str, ...] | None
    router_url: str | None
    concurrency: int
    deterministic_seed: int | None  # sampling_seed base when deterministic inference is on


def accel_values(args: Any) -> dict[str, Any]:
    """The `accel_*` attributes set on `args`, each checked; unknown keys are errors."""
    raw = {name: getattr(args, name) for name in dir(args) if name.startswith(PREFIX)}
    return check_accel_mapping(raw)


def check_accel_mapping(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Checks a mapping of `accel_*` keys (e.g. the custom-config YAML); None values are
    dropped (= default). Keys without the prefix are left to slime and other plugins."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not key.startswith(PREFIX):
            continue
        spec = KEYS_BY_NAME.get(key)
        if spec is None:
            near = difflib.get_close_matches(key, KEYS_BY_NAME, n=1)
            hint = (
                f"; did you mean {near[0]!r}?" if near else f"; known keys: {sorted(KEYS_BY_NAME)}"
            )
            raise SlimeSettingsError(f"{key}: unknown rollout_accel setting{hint}")
        if value is not None:
            out[key] = spec.check(key, value)
    return out


def load_custom_config(path: str | Path) -> dict[str, Any]:
    """Reads a --custom-config-path YAML as slime does and checks its `accel_*` keys."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise SlimeSettingsError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise SlimeSettingsError(f"{path}: the top level must be a mapping of key: value")
    check_accel_mapping(data)
    return data


def _flag(args: Any, name: str, default: Any = None) -> Any:
    value = getattr(args, name, default)
    return default if value is None else value


def history_path_from_args(args: Any) -> str | None:
    """The live history file: accel_history_path, else <save>/rollout/accel_history.db."""
    explicit = getattr(args, "accel_history_path", None)
    if explicit is not None:
        return _text("accel_history_path", explicit)
    save = getattr(args, "save", None)
    return str(Path(save) / "rollout" / "accel_history.db") if save else None


def buffer_settings(args: Any) -> tuple[int, str]:
    """(max_staleness, stale_action) for the partial buffer, from the accel keys alone."""
    staleness = getattr(args, "accel_max_staleness", None)
    action = getattr(args, "accel_stale_action", None)
    return (
        _int(0)("accel_max_staleness", staleness) if staleness is not None else 1,
        _choice("drop", "restart")("accel_stale_action", action) if action is not None else "drop",
    )


def _refuse_unsupported(args: Any) -> None:
    """slime features our controller does not carry: fail at start, not mid-training."""
    if getattr(args, "group_rm", False):
        raise SlimeSettingsError(
            "--group-rm: not supported by rollout_accel (rewards are computed per sample as each "
            "group finishes); use a per-sample --custom-rm-path"
        )
    if getattr(args, "custom_generate_function_path", None):
        raise SlimeSettingsError(
            "--custom-generate-function-path: not supported by rollout_accel's rollout function "
            "(it drives the engines itself); use slime's default rollout for custom generation"
        )
    top_p = getattr(args, "rollout_top_p", 1.0)
    if top_p is not None and top_p != 1.0:
        raise SlimeSettingsError(
            f"--rollout-top-p: {top_p} needs top-p token replay, which rollout_accel does not "
            "record yet; use --rollout-top-p 1.0"
        )
    if getattr(args, "use_rollout_routing_replay", False):
        raise SlimeSettingsError(
            "--use-rollout-routing-replay: routed-expert replay is not recorded by rollout_accel"
        )


def sampling_params_from_args(args: Any) -> dict[str, Any]:
    """slime's rollout sampling parameters (GenerateState's), None values left out."""
    max_len = getattr(args, "rollout_max_response_len", None)
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise SlimeSettingsError(
            f"--rollout-max-response-len: must be set to a positive integer, got {max_len!r}"
        )
    params: dict[str, Any] = {
        "temperature": _flag(args, "rollout_temperature", 1.0),
        "top_p": _flag(args, "rollout_top_p", 1.0),
        "top_k": _flag(args, "rollout_top_k", -1),
        "max_new_tokens": max_len,
        "stop": getattr(args, "rollout_stop", None),
        "stop_token_ids": getattr(args, "rollout_stop_token_ids", None),
        "skip_special_tokens": bool(getattr(args, "rollout_skip_special_tokens", False)),
        "no_stop_trim": True,
        "spaces_between_special_tokens": False,
    }
    return {k: v for k, v in params.items() if v is not None}


def _default_policy(args: Any) -> str:
    if getattr(args, "partial_rollout", False):
        return "partial"
    if getattr(args, "dynamic_sampling_filter_path", None):
        return "dynamic"
    return "sync"


def _over_sampling(args: Any, batch: int) -> float:
    over_batch = getattr(args, "over_sampling_batch_size", None)
    if isinstance(over_batch, int) and not isinstance(over_batch, bool) and over_batch > batch:
        return over_batch / batch
    return DEFAULT_OVER_SAMPLING


_CONTROLLER_SOURCES = {
    "policy": "accel_policy",
    "rollout_batch_size": "--rollout-batch-size",
    "n_samples_per_prompt": "--n-samples-per-prompt",
    "over_sampling": "accel_over_sampling",
    "max_staleness": "accel_max_staleness",
    "stale_action": "accel_stale_action",
    "tail_budget": "accel_tail_budget",
    "sampling_params": "--rollout-max-response-len",
}


def settings_from_args(args: Any) -> SlimeSettings:
    """Resolves the plugin's settings from slime's parsed `args` (see the module docstring)."""
    if args is None:
        raise SlimeSettingsError(
            "args: rollout_accel needs slime's parsed arguments (got None); run it from slime"
        )
    accel = accel_values(args)
    _refuse_unsupported(args)
    batch = getattr(args, "rollout_batch_size", None)
    n = _flag(args, "n_samples_per_prompt", 1)
    policy = accel.get("accel_policy", _default_policy(args))
    fields: dict[str, Any] = {
        "policy": policy,
        "rollout_batch_size": batch,
        "n_samples_per_prompt": n,
        "over_sampling": accel.get(
            "accel_over_sampling",
            _over_sampling(args, batch) if isinstance(batch, int) and batch > 0 else 1.0,
        ),
        "dynamic_filter": accel.get("accel_dynamic_filter"),
        "max_staleness": accel.get("accel_max_staleness", 1),
        "stale_action": accel.get("accel_stale_action", "drop"),
        "mask_offpolicy": accel.get(
            "accel_mask_offpolicy", bool(getattr(args, "mask_offpolicy_in_partial_rollout", False))
        ),
        "keep_surplus": accel.get("accel_keep_surplus", True),
        "max_candidates_factor": accel.get("accel_max_candidates_factor", 8.0),
        "reward_key": getattr(args, "reward_key", None),
        "record_responses": accel.get("accel_record_responses", False),
        "tail_budget": accel.get("accel_tail_budget"),
        "drafts": accel.get("accel_drafts", False),
        "sampling_params": sampling_params_from_args(args),
        "seed": accel.get("accel_seed", _flag(args, "rollout_seed", 0)),
    }
    try:
        controller = ControllerConfig(**fields)
    except ControllerConfigError as exc:
        field_name = str(exc).split(":", 1)[0]
        source = _CONTROLLER_SOURCES.get(field_name, field_name)
        raise SlimeSettingsError(f"{source}: {str(exc).split(':', 1)[-1].strip()}") from exc
    planner = None
    if policy == "history":
        try:
            planner = PlannerConfig(
                selector=SelectorConfig(
                    target_effective_share=accel.get("accel_target_effective_share", 0.75),
                    max_consecutive_skips=accel.get("accel_max_consecutive_skips", 3),
                    max_skips_bound=max(12, accel.get("accel_max_consecutive_skips", 3)),
                ),
                # slime trains on whole groups of n: the allocator only picks prompts.
                allocator=AllocatorConfig(min_n=1, max_n=max(32, n), fixed_n=n),
                length=LengthConfig(
                    quantile=accel.get("accel_length_quantile", 0.9),
                    max_len=controller.sampling_params["max_new_tokens"],
                ),
                skip=accel.get("accel_skip", True),
            )
        except InvalidConfigError as exc:
            raise SlimeSettingsError(f"history planner: {exc}") from exc
    ip, port = getattr(args, "sglang_router_ip", None), getattr(args, "sglang_router_port", None)
    router = f"http://{ip}:{port}" if ip and port else None
    engine_urls = accel.get("accel_engine_urls")
    if engine_urls is None and router is None:
        raise SlimeSettingsError(
            "--sglang-router-ip/--sglang-router-port: not set, and no accel_engine_urls given; "
            "rollout_accel has no engine to talk to"
        )
    concurrency = _flag(args, "sglang_server_concurrency", 512)
    _int(1)("--sglang-server-concurrency", concurrency)
    deterministic = bool(getattr(args, "sglang_enable_deterministic_inference", False))
    return SlimeSettings(
        controller=controller,
        planner=planner,
        history_path=history_path_from_args(args),
        reward=accel.get("accel_reward"),
        payload_hook=accel.get("accel_payload_hook"),
        dynamic_filter_path=getattr(args, "dynamic_sampling_filter_path", None),
        engine_urls=engine_urls,
        router_url=router,
        concurrency=concurrency,
        deterministic_seed=_flag(args, "rollout_seed", 42) if deterministic else None,
    )


def settings_table() -> str:
    """ACCEL_KEYS as a Markdown table (key, type, default, meaning)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key in ACCEL_KEYS:
        rows.append(f"| `{key.name}` | {key.kind} | {key.default} | {key.doc} |")
    return "\n".join(rows)


__all__ = [
    "ACCEL_KEYS",
    "AccelKey",
    "SlimeSettings",
    "SlimeSettingsError",
    "accel_values",
    "buffer_settings",
    "check_accel_mapping",
    "history_path_from_args",
    "load_custom_config",
    "sampling_params_from_args",
    "settings_from_args",
    "settings_table",
]
