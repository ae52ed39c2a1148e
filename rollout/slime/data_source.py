"""Prompts for the slime plugin: slime's data source (`DataSource`, with the partial buffer and
history saved alongside slime's checkpoints) and the controller's view of any data source
(`SlimePromptSource`); helpers that load objects by dotted path and tokenize slime prompts.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import logging
import os
import random
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rollout_accel.rollout.partial_buffer import BufferedGroup, PartialBuffer
from rollout_accel.rollout.prompts import PromptItem
from rollout_accel.rollout.sample_types import Sample
from rollout_accel.rollout.slime_settings import (
    SlimeSettingsError,
    buffer_settings,
)
from rollout_accel.sampling import prompt_key_for_tokens

log = logging.getLogger(__name__)
Group = list[Sample]


try:  # pragma: no cover - exercised only where slime is installed
    from slime.rollout.data_source import RolloutDataSource as _SlimePromptData
except ImportError:
    _SlimePromptData = None


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
        from rollout_accel.rollout.slime.background import _plugin

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
            from rollout_accel.rollout.slime.background import _plugin

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
