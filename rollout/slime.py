"""slime plugin: the rollout function, data source and dynamic filter slime loads by dotted path.

    --rollout-function-path        rollout_accel.rollout.slime.generate_rollout
    --data-source-path             rollout_accel.rollout.slime.DataSource
    --dynamic-sampling-filter-path rollout_accel.rollout.slime.nonzero_std_filter
    --custom-config-path           a YAML of `accel_*` keys (rollout/slime_settings.py)

slime calls `generate_rollout` synchronously inside its RolloutManager Ray actor. The engine pool,
controller, partial buffer and history must outlive one call, and aiohttp sessions and SQLite
connections belong to the loop / thread that made them, so everything runs on one background
event loop owned by a module-level singleton (as slime's own `run()` helper does); the actor
thread only submits work to it and waits.

One train call: list the router's workers -> dispatch through the RolloutController (prompts
from slime's data source, groups of slime Samples filled in place) -> exactly
`rollout_batch_size` groups of `n_samples_per_prompt`, sorted by sample index as slime does.
With our `DataSource`, partial groups and the history are saved and loaded with slime's
checkpoints; with another data source they live in memory only.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import importlib
import json
import logging
import os
import random
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from rollout_accel.rollout.controller import RolloutController
from rollout_accel.rollout.controller_config import ControllerConfig
from rollout_accel.rollout.partial_buffer import BufferedGroup, PartialBuffer
from rollout_accel.rollout.pool import EnginePool, HttpEngine, expand_router
from rollout_accel.rollout.prompts import ListPromptSource, PromptItem
from rollout_accel.rollout.rewards import RewardFn, load_reward
from rollout_accel.rollout.sample_types import (
    SLIME_AVAILABLE,
    RolloutFnEvalOutput,
    RolloutFnTrainOutput,
    Sample,
    Status,
)
from rollout_accel.rollout.slime_settings import (
    SlimeSettings,
    SlimeSettingsError,
    buffer_settings,
    history_path_from_args,
    settings_from_args,
)
from rollout_accel.sampling import HistoryStore, RolloutPlanner, prompt_key_for_tokens

try:  # pragma: no cover - exercised only where slime is installed
    from slime.rollout.data_source import RolloutDataSource as _SlimePromptData
    from slime.rollout.filter_hub.base_types import DynamicFilterOutput
except ImportError:
    _SlimePromptData = None

    @dataclass
    class DynamicFilterOutput:  # type: ignore[no-redef]
        """The fallback of slime.rollout.filter_hub.base_types.DynamicFilterOutput."""

        keep: bool
        reason: str | None = None
        keep_when_insufficient: bool = False


log = logging.getLogger(__name__)
T = TypeVar("T")
Group = list[Sample]


# -- the background loop -----------------------------------------------------------------------
class _BackgroundLoop:
    """One event loop on a daemon thread; `run` blocks the caller until a coroutine is done."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, name="rollout-accel-slime", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            raise RuntimeError("rollout_accel.rollout.slime: called from its own event loop")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs a plain function on the loop's thread (SQLite objects live there)."""

        async def wrapper() -> T:
            return fn(*args)

        return self.run(wrapper())


class _Plugin:
    """The process-wide state: the loop, the runtime of the current `args`, history stores."""

    def __init__(self) -> None:
        self.loop = _BackgroundLoop()
        self.runtime: _Runtime | None = None
        self.stores: dict[str, HistoryStore] = {}  # by resolved path; used on the loop only
        self._tmpdir: str | None = None

    def history_path(self, args: Any) -> str:
        path = history_path_from_args(args)
        if path is None:
            if self._tmpdir is None:
                self._tmpdir = tempfile.mkdtemp(prefix="rollout-accel-history-")
            path = os.path.join(self._tmpdir, "accel_history.db")
        return str(Path(path).resolve())

    def store(self, path: str) -> HistoryStore:
        """The open store at `path` (opened on first use); call on the loop thread only."""
        if path not in self.stores:
            self.stores[path] = HistoryStore(path)
        return self.stores[path]

    def runtime_for(self, args: Any) -> _Runtime:
        """The runtime of these `args`; a different args object (a new run) rebuilds it."""
        if self.runtime is not None and self.runtime.args is args:
            return self.runtime
        settings = settings_from_args(args)
        old, self.runtime = self.runtime, None
        if old is not None:
            self.loop.run(old.close())
        self.runtime = self.loop.run(_Runtime.create(args, settings, self))
        return self.runtime

    def shutdown(self) -> None:
        runtime, self.runtime = self.runtime, None
        if runtime is not None:
            self.loop.run(runtime.close())
        stores, self.stores = self.stores, {}
        if stores:
            self.loop.call(lambda: [s.close() for s in stores.values()])


_PLUGIN: _Plugin | None = None
_PLUGIN_LOCK = threading.Lock()


def _plugin() -> _Plugin:
    global _PLUGIN
    with _PLUGIN_LOCK:
        if _PLUGIN is None:
            _PLUGIN = _Plugin()
        return _PLUGIN


def shutdown() -> None:
    """Closes the engine connections and history stores (the loop thread stays, idle). A later
    call starts afresh; tests call this between runs with different settings."""
    if _PLUGIN is not None:
        _PLUGIN.shutdown()


# -- helpers -------------------------------------------------------------------------------------
def _load_object(path: str, what: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise SlimeSettingsError(f"{what}: cannot load {path!r} ({exc})") from exc


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=True)


def _tokenize_prompt(args: Any, prompt: Any) -> list[int]:
    """Prompt ids as slime makes them: text encoded without special tokens; chat messages
    through the tokenizer's chat template first."""
    path = getattr(args, "hf_checkpoint", None)
    if not path:
        raise SlimeSettingsError("--hf-checkpoint: needed to tokenize prompts that carry no tokens")
    tok = _tokenizer(str(path))
    if isinstance(prompt, list):
        prompt = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise ValueError(f"prompt: expected text or chat messages, got {type(prompt).__name__}")
    return list(tok.encode(prompt, add_special_tokens=False))


def _prompt_ids(args: Any, group: Group) -> list[int]:
    """The group's prompt ids; fills `tokens` of samples that have none (all share the prompt)."""
    first = group[0]
    if first.tokens:
        ids = list(first.tokens[: len(first.tokens) - first.response_length])
    else:
        if first.multimodal_inputs and any(v is not None for v in first.multimodal_inputs.values()):
            raise ValueError("multimodal prompts are not supported by rollout_accel's rollout")
        ids = _tokenize_prompt(args, first.prompt)
    for sample in group:
        if not sample.tokens:
            sample.tokens = list(ids)
    return ids


def _sample_json(sample: Sample) -> dict[str, Any]:
    out = {}
    for key, value in sample.to_dict().items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue  # tensors and helper objects: not needed to resume a pending prompt
        out[key] = value
    return out


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _group_key(group: Group, prompt_ids: Sequence[int]) -> str:
    key = group[0].metadata.get("prompt_key") if isinstance(group[0].metadata, dict) else None
    return str(key) if key else prompt_key_for_tokens(prompt_ids)


# -- prompts without slime ---------------------------------------------------------------------
def _read_rows(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _prompt_sample(
    args: Any,
    row: dict[str, Any],
    input_key: str,
    label_key: str | None,
    metadata_key: str,
    chat: bool,
) -> Sample:
    """One dataset row as slime's Dataset builds it (prompt text, label, metadata)."""
    if input_key not in row:
        raise KeyError(f"prompt data: row without input key {input_key!r}")
    prompt = row[input_key]
    if chat:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        path = getattr(args, "hf_checkpoint", None)
        if not path:
            raise SlimeSettingsError("--hf-checkpoint: needed by --apply-chat-template")
        prompt = _tokenizer(str(path)).apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=True,
            **(getattr(args, "apply_chat_template_kwargs", None) or {}),
        )
    metadata = row.get(metadata_key) or {}
    return Sample(
        prompt=prompt, label=row.get(label_key) if label_key else None, metadata=dict(metadata)
    )


class _JsonlPrompts:
    """slime's RolloutDataSource behaviour where slime is not importable: JSONL prompt data,
    reshuffled per epoch with the rollout seed, groups of n deep copies with running indices."""

    def __init__(self, args: Any) -> None:
        self.args = args
        self.epoch_id = 0
        self.sample_offset = 0
        self.sample_group_index = 0
        self.sample_index = 0
        self.prompts: list[Sample] = []
        self._order: list[int] = []
        path = getattr(args, "prompt_data", None)
        if path and getattr(args, "rollout_global_dataset", True):
            self.prompts = [
                _prompt_sample(
                    args,
                    row,
                    getattr(args, "input_key", None) or "text",
                    getattr(args, "label_key", None),
                    getattr(args, "metadata_key", None) or "metadata",
                    bool(getattr(args, "apply_chat_template", False)),
                )
                for row in _read_rows(path)
            ]
        self._shuffle()

    def _shuffle(self) -> None:
        self._order = list(range(len(self.prompts)))
        if getattr(self.args, "rollout_shuffle", False):
            random.Random(int(getattr(self.args, "rollout_seed", 42) or 0) + self.epoch_id).shuffle(
                self._order
            )

    def __len__(self) -> int:
        return len(self.prompts)

    def get_samples(self, num_samples: int) -> list[Group]:
        picked: list[Sample] = []
        if not self.prompts:
            picked = [Sample() for _ in range(num_samples)]
        while len(picked) < num_samples:
            if self.sample_offset >= len(self._order):
                self.epoch_id += 1
                self.sample_offset = 0
                self._shuffle()
            picked.append(self.prompts[self._order[self.sample_offset]])
            self.sample_offset += 1
        groups = []
        n = int(getattr(self.args, "n_samples_per_prompt", 1) or 1)
        for prompt in picked:
            group = []
            for _ in range(n):
                sample = copy.deepcopy(prompt)
                sample.group_index, sample.index = self.sample_group_index, self.sample_index
                self.sample_index += 1
                group.append(sample)
            self.sample_group_index += 1
            groups.append(group)
        return groups

    def state(self) -> dict[str, int]:
        return {
            "epoch_id": self.epoch_id,
            "sample_offset": self.sample_offset,
            "sample_group_index": self.sample_group_index,
            "sample_index": self.sample_index,
        }

    def restore(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))
        self._shuffle()


# -- the data source ---------------------------------------------------------------------------
class DataSource:
    """slime data source (`--data-source-path rollout_accel.rollout.slime.DataSource`).

    Prompts come from slime's own `RolloutDataSource` when slime is importable (same dataset
    flags, shuffling and checkpoint file), else from an equivalent JSONL reader. On top it keeps
    the partial-rollout buffer (`buffer`, shared with the controller, staleness-bounded) and the
    prompts the planner deferred, and saves / loads both, plus the history snapshot, next to
    slime's `<save>/rollout/global_dataset_state_dict_<id>.pt`.
    slime semantics hold for other rollout functions: `get_samples` serves buffered groups
    first, `add_samples` takes groups of exactly n samples back.
    """

    def __init__(self, args: Any) -> None:
        self.args = args
        self.n = int(getattr(args, "n_samples_per_prompt", 1) or 1)
        staleness, action = buffer_settings(args)
        self.buffer = PartialBuffer(staleness, action)
        self.returned: deque[Group] = deque()  # drawn but not rolled out: served first
        self._slime = _SlimePromptData(args) if _SlimePromptData is not None else None
        self._jsonl = None if self._slime is not None else _JsonlPrompts(args)

    def _fresh(self, count: int) -> list[Group]:
        source = self._slime if self._slime is not None else self._jsonl
        return source.get_samples(count) if count > 0 else []

    def take_fresh(self, num_samples: int) -> list[Group]:
        """Groups not yet generated: those handed back first, then new prompts."""
        out: list[Group] = []
        while self.returned and len(out) < num_samples:
            out.append(self.returned.popleft())
        return out + self._fresh(num_samples - len(out))

    def give_back(self, groups: Sequence[Group]) -> None:
        """Returns untouched groups to the front, in order (the planner deferred them)."""
        self.returned.extendleft(reversed(list(groups)))

    def get_samples(self, num_samples: int) -> list[Group]:
        """slime's contract: buffered (partial) groups first, then fresh ones."""
        count = min(num_samples, len(self.buffer))
        taken, self.buffer.groups = self.buffer.groups[:count], self.buffer.groups[count:]
        return [g.samples for g in taken] + self.take_fresh(num_samples - count)

    def add_samples(self, samples: list[Group]) -> None:
        """Groups back from a rollout: those with generated tokens go to the partial buffer,
        untouched ones to the front of the prompt queue."""
        for i, group in enumerate(samples or []):
            if not isinstance(group, list) or len(group) != self.n:
                size = len(group) if isinstance(group, list) else type(group).__name__
                raise ValueError(
                    f"add_samples: group {i} has {size} samples, expected n_samples_per_prompt={self.n}"
                )
            if any(s.response_length > 0 for s in group):
                ids = _prompt_ids(self.args, group)
                self.buffer.add([BufferedGroup(_group_key(group, ids), group, ids)])
            else:
                self.returned.append(group)

    def __len__(self) -> int:
        return len(self._slime if self._slime is not None else self._jsonl)

    # -- checkpoints ----------------------------------------------------------------------------
    @staticmethod
    def _files(base: str, rollout_id: int) -> tuple[Path, Path, Path]:
        root = Path(base) / "rollout"
        return (
            root,
            root / f"accel_partial_buffer_{rollout_id}.json",
            root / f"accel_source_{rollout_id}.json",
        )

    def save(self, rollout_id: int) -> None:
        if self._slime is not None:
            self._slime.save(rollout_id)
        save = getattr(self.args, "save", None)
        if not save:
            log.info("rollout_accel DataSource.save: no --save directory; state not saved")
            return
        root, buffer_file, source_file = self._files(save, rollout_id)
        self.buffer.save(buffer_file)
        state = {
            "returned": [[_sample_json(s) for s in g] for g in self.returned],
            "prompts": self._jsonl.state() if self._jsonl is not None else None,
        }
        _atomic_write(source_file, json.dumps(state))
        plugin = _plugin()
        path = plugin.history_path(self.args)
        if path in plugin.stores:  # nothing recorded otherwise
            plugin.loop.call(plugin.stores[path].save, rollout_id, root)

    def load(self, rollout_id: int | None = None) -> None:
        if self._slime is not None:
            self._slime.load(rollout_id)
        load = getattr(self.args, "load", None)
        if rollout_id is None or rollout_id < 0 or not load:
            return
        root, buffer_file, source_file = self._files(load, rollout_id)
        if buffer_file.is_file():
            self.buffer.load(buffer_file)
        if source_file.is_file():
            state = json.loads(source_file.read_text())
            self.returned = deque([Sample.from_dict(s) for s in g] for g in state["returned"])
            if self._jsonl is not None and state.get("prompts"):
                self._jsonl.restore(state["prompts"])
        snapshot = root / f"history_{rollout_id}.db"
        if snapshot.is_file():
            plugin = _plugin()
            path = plugin.history_path(self.args)

            def restore() -> None:
                plugin.store(path).load(rollout_id, root)
                runtime = plugin.runtime
                if runtime is not None and runtime.planner is not None:
                    runtime.planner.reload()

            plugin.loop.call(restore)


# -- the controller's view of a slime data source ---------------------------------------------
class SlimePromptSource:
    """PromptSource over a slime data source: each slime group is one PromptItem whose
    metadata["samples"] holds the group, filled in place by the controller. Keys hash the prompt
    ids (stable across epochs and restarts), made unique within one take."""

    def __init__(self, args: Any, data_source: Any) -> None:
        self.args = args
        self.data_source = data_source
        self._returned: deque[PromptItem] = deque()  # for data sources without give_back

    def take(self, count: int) -> list[PromptItem]:
        items: list[PromptItem] = []
        while self._returned and len(items) < count:
            items.append(self._returned.popleft())
        want = count - len(items)
        if want > 0:
            if hasattr(self.data_source, "take_fresh"):
                groups = self.data_source.take_fresh(want)
            else:
                groups = self.data_source.get_samples(want)
            items.extend(self._item(g) for g in groups)
        seen: dict[str, int] = {}
        for item in items:
            base = item.key.split("#", 1)[0]
            seen[base] = seen.get(base, 0) + 1
            item.key = base if seen[base] == 1 else f"{base}#{seen[base]}"
        return items

    def _item(self, group: Group) -> PromptItem:
        ids = _prompt_ids(self.args, group)
        first = group[0]
        prompt = first.prompt if isinstance(first.prompt, str) else None
        return PromptItem(_group_key(group, ids), ids, first.label, prompt, {"samples": group})

    def give_back(self, items: Sequence[PromptItem]) -> None:
        if hasattr(self.data_source, "give_back"):
            self.data_source.give_back([item.metadata["samples"] for item in items])
        else:
            self._returned.extendleft(reversed(list(items)))


# -- dynamic filter ------------------------------------------------------------------------------
def nonzero_std_filter(args: Any, samples: list[Sample], **kwargs: Any) -> DynamicFilterOutput:
    """DAPO's filter (`--dynamic-sampling-filter-path`): keep a group whose rewards are not all
    equal; the drop reason is `zero_std_<reward>` as slime's own filter names it."""
    key = getattr(args, "reward_key", None) if args is not None else None
    rewards = [float(s.reward[key]) if key else float(s.reward) for s in samples]
    keep = len(rewards) > 1 and max(rewards) - min(rewards) > 1e-6
    return DynamicFilterOutput(
        keep=keep, reason=None if keep else f"zero_std_{round(rewards[0], 1)}"
    )


class _FilterAdapter:
    """A slime dynamic filter as the controller's `group_filter`, counting drop reasons."""

    def __init__(self, args: Any, fn: Callable[..., Any]) -> None:
        self.args, self.fn = args, fn
        self.drops: dict[str, int] = {}

    def __call__(self, samples: list[Sample]) -> bool:
        out = self.fn(self.args, samples)
        keep, reason = (out.keep, out.reason) if hasattr(out, "keep") else (out, None)
        if not keep and reason:
            self.drops[reason] = self.drops.get(reason, 0) + 1
        return bool(keep)


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


# -- the runtime ---------------------------------------------------------------------------------
class _Runtime:
    """Pool + controller + planner for one slime run (one `args`); lives on the loop thread."""

    def __init__(self, args: Any, settings: SlimeSettings, plugin: _Plugin) -> None:
        self.args = args
        self.settings = settings
        self.plugin = plugin
        self.urls: list[str] = []
        self.pool: EnginePool | None = None
        self.planner: RolloutPlanner | None = None
        self.reward = self._reward()
        self.filter: _FilterAdapter | None = None
        cfg = settings.controller
        if settings.dynamic_filter_path and cfg.dynamic_filter is not False:
            self.filter = _FilterAdapter(
                args, _load_object(settings.dynamic_filter_path, "--dynamic-sampling-filter-path")
            )
        self.user_hook = (
            _load_object(settings.payload_hook, "accel_payload_hook")
            if settings.payload_hook
            else None
        )
        self.controller: RolloutController | None = None
        self._own_buffer = PartialBuffer(cfg.max_staleness, cfg.stale_action)
        self._sources: dict[int, SlimePromptSource] = {}
        self._eval_cache: dict[tuple[str, str], list[Sample]] = {}
        self._eval_rewards: dict[str, RewardFn] = {}
        self._warned = False

    @classmethod
    async def create(cls, args: Any, settings: SlimeSettings, plugin: _Plugin) -> _Runtime:
        self = cls(args, settings, plugin)
        await self.refresh_engines()
        if settings.planner is not None:
            store = plugin.store(plugin.history_path(args))
            self.planner = RolloutPlanner(store, settings.planner)
        self.controller = RolloutController(
            self.pool,
            SlimePromptSource(args, None),
            self.reward,
            settings.controller,
            planner=self.planner,
            payload_hook=self._hook,
            group_filter=self.filter,
        )
        return self

    def _reward(self) -> RewardFn:
        """accel_reward, else slime's reward dispatch (--custom-rm-path, --rm-type), else
        --custom-rm-path loaded directly where slime is not importable."""
        if self.settings.reward:
            return load_reward(self.settings.reward, self.args)
        if SLIME_AVAILABLE:  # pragma: no cover - needs slime
            from slime.rollout.rm_hub import async_rm

            return load_reward(async_rm, self.args)
        path = getattr(self.args, "custom_rm_path", None)
        if path:
            return load_reward(path, self.args)
        raise SlimeSettingsError(
            "reward: none configured; set --custom-rm-path (or accel_reward; --rm-type needs slime)"
        )

    def _hook(
        self, sample: Sample, payload: dict[str, Any], n: int | None = None
    ) -> dict[str, Any]:
        seed = self.settings.deterministic_seed
        if seed is not None:  # slime's deterministic inference: one seed per position in group
            n = n or self.settings.controller.n_samples_per_prompt
            payload["sampling_params"]["sampling_seed"] = seed + (sample.index or 0) % n
        return self.user_hook(sample, payload) if self.user_hook else payload

    async def refresh_engines(self) -> None:
        """(Re)lists the router's workers; a changed list (engines recovered, added) gets a
        fresh pool. Requests go to workers directly so an abort reaches every one of them."""
        if self.settings.engine_urls is not None:
            urls = list(self.settings.engine_urls)
        else:
            urls = await expand_router(self.settings.router_url)
        if urls == self.urls and self.pool is not None:
            return
        old = self.pool
        self.urls = urls
        self.pool = EnginePool(
            [HttpEngine(u) for u in urls], concurrency_per_engine=self.settings.concurrency
        )
        if self.controller is not None:
            self.controller.pool = self.pool
        if old is not None:
            await old.close()

    async def train(self, rollout_id: int, data_source: Any) -> RolloutFnTrainOutput:
        await self.refresh_engines()
        ctl = self.controller
        source = self._sources.get(id(data_source))
        if source is None or source.data_source is not data_source:
            source = self._sources[id(data_source)] = SlimePromptSource(self.args, data_source)
        ctl.source = source
        # Our DataSource owns the buffer so it is checkpointed with slime; others: in memory.
        if isinstance(data_source, DataSource):
            ctl.buffer = data_source.buffer
        else:
            if self.settings.controller.keeps_partials and not self._warned:
                log.warning(
                    "rollout_accel: partial groups are kept in memory only; use "
                    "--data-source-path rollout_accel.rollout.slime.DataSource to checkpoint them"
                )
                self._warned = True
            ctl.buffer = self._own_buffer
        if self.filter is not None:
            self.filter.drops.clear()
        out = await ctl.step(rollout_id)
        target = self.settings.controller.rollout_batch_size
        if len(out.groups) != target:
            raise RuntimeError(
                f"rollout {rollout_id}: the data source ran out ({len(out.groups)} of {target} groups)"
            )
        groups = sorted(out.groups, key=lambda g: g[0].index if g[0].index is not None else -1)
        metrics: dict[str, Any] = dict(out.metrics)
        metrics["accel/engines"] = float(len(self.urls))
        if self.filter is not None:
            metrics.update(
                {f"rollout/dynamic_filter/drop_{r}": c for r, c in self.filter.drops.items()}
            )
        return RolloutFnTrainOutput(samples=groups, metrics=metrics)

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

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()


# -- the rollout function -----------------------------------------------------------------------
def generate_rollout(
    args: Any, rollout_id: int, data_source: Any, evaluation: bool = False
) -> RolloutFnTrainOutput | RolloutFnEvalOutput:
    """slime's rollout function (`--rollout-function-path`). Train: exactly
    `args.rollout_batch_size` groups of `args.n_samples_per_prompt` filled Samples, sorted by
    index, with metrics. Evaluation: slime's eval output over its eval datasets."""
    plugin = _plugin()
    runtime = plugin.runtime_for(args)
    if evaluation:
        return plugin.loop.run(runtime.evaluate(rollout_id))
    return plugin.loop.run(runtime.train(rollout_id, data_source))


__all__ = [
    "DataSource",
    "DynamicFilterOutput",
    "SlimePromptSource",
    "generate_rollout",
    "nonzero_std_filter",
    "shutdown",
]
