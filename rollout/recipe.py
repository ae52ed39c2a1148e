"""Local training recipes: one TOML file per run of `rollout train` (recipes/local/*.toml).

A recipe has six tables, each a frozen dataclass below: `[task]` (which toy task, its options),
`[model]` (the tiny Qwen3's size), `[rollout]` (policy and sampling), `[train]` (RL and SFT
optimisation), `[eval]` (held-out greedy accuracy) and `[run]` (seed, output, W&B). Every table
and key is optional; defaults are the dataclass defaults.

Invariant: a `Recipe` object is always valid. `load_recipe` / `recipe_from_dict` check every key
(unknown keys, wrong types, out-of-range values, unknown task or policy, bad task options) before
anything runs and raise one `RecipeError` whose message starts with the dotted key at fault, e.g.
`rollout.policy: 'fast' is not one of ...`.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rollout_accel.rollout.controller_config import POLICIES
from rollout_accel.rollout.tasks.registry import TASKS, task_config_class

ENGINE_KINDS = ("inprocess", "http")
WANDB_MODES = ("auto", "offline", "online", "disabled")


class RecipeError(ValueError):
    """A recipe that cannot run; the message starts with the dotted key at fault."""


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """The toy task: `name` from the task registry, `options` its config fields.

    `train_size` distinct training prompts are cycled by the RL loop (a few epochs over a fixed
    set, as RL post-training runs do); SFT draws `sft_size` of its own from the train split.
    """

    name: str = "arithmetic"
    options: dict[str, Any] = field(default_factory=dict)
    train_size: int = 512
    sft_size: int = 2048


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A Qwen3-shaped decoder; head_dim = hidden / heads; `intermediate` 0 means 2 x hidden."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 0
    max_positions: int = 512

    @property
    def intermediate_size(self) -> int:
        return self.intermediate or 2 * self.hidden


@dataclass(frozen=True, slots=True)
class RolloutSpec:
    """The rollout policy (sync / dynamic / partial / history) and its sampling.

    `engine`: `inprocess` (the Engine in this process) or `http` (the same engine behind the
    SGLang-protocol server on loopback; weights go through /update_weights_from_tensor).
    `dynamic_filter`: absent = the policy's own default (`ControllerConfig.filter_enabled`).
    `tail_budget`: the max-of-n tail (`ControllerConfig.tail_budget`); absent = off.
    """

    policy: str = "sync"
    engine: str = "inprocess"
    rollout_batch_size: int = 16
    n: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 64
    over_sampling: float = 1.5
    max_staleness: int = 1
    mask_offpolicy: bool = False
    dynamic_filter: bool | None = None
    max_running_requests: int = 256
    tail_budget: float | None = None


@dataclass(frozen=True, slots=True)
class TrainSpec:
    """GRPO steps and learning rate, and the SFT warm start before them."""

    steps: int = 40
    lr: float = 3e-4
    sft_steps: int = 600
    sft_lr: float = 1e-3
    sft_batch_size: int = 16


@dataclass(frozen=True, slots=True)
class EvalSpec:
    """Greedy accuracy on `size` held-out problems every `every` RL steps (and at 0 and the end).

    The held-out set depends on `seed` only, not on the run seed, so runs of different seeds are
    scored on the same problems.
    """

    every: int = 5
    size: int = 256
    seed: int = 0


@dataclass(frozen=True, slots=True)
class RunSpec:
    """Seed, where outputs go, and logging.

    Outputs land in `out_dir/<name>-seed<seed>/`; the SFT checkpoint cache is shared under
    `out_dir/sft-cache/`. `wandb_mode` `auto` is offline unless WANDB_MODE or WANDB_API_KEY says
    otherwise (see `tracking.resolve_wandb_mode`). `name` empty means the recipe file's stem.
    `torch_threads`: intra-op threads during the run; 1 by default, since the engine thread and
    the trainer share the cores and tiny matmuls gain nothing from more.
    """

    name: str = ""
    seed: int = 0
    out_dir: str = "runs/local"
    wandb_mode: str = "auto"
    wandb_project: str = "rollout-accel-local"
    torch_threads: int = 1


@dataclass(frozen=True, slots=True)
class Recipe:
    """One local training run; see the module docstring."""

    task: TaskSpec = field(default_factory=TaskSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    rollout: RolloutSpec = field(default_factory=RolloutSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    run: RunSpec = field(default_factory=RunSpec)

    @property
    def run_name(self) -> str:
        return f"{self.run.name or 'local'}-seed{self.run.seed}"

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run_name

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (TOML tables); `recipe_from_dict(r.to_dict()) == r`."""
        return dataclasses.asdict(self)

    def with_updates(self, updates: Mapping[str, Any]) -> Recipe:
        """A copy with dotted keys replaced (`{"rollout.policy": "history"}`), re-validated."""
        raw = self.to_dict()
        for key, value in updates.items():
            _set_dotted(raw, key, value)
        return recipe_from_dict(raw)


_SECTIONS: dict[str, type] = {
    "task": TaskSpec,
    "model": ModelSpec,
    "rollout": RolloutSpec,
    "train": TrainSpec,
    "eval": EvalSpec,
    "run": RunSpec,
}


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Reads a TOML recipe, applies `KEY=VALUE` overrides (VALUE in TOML syntax, bare words are
    strings), validates everything. `run.name` defaults to the file's stem."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe: no such file {str(path)!r}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"recipe: {path} is not valid TOML ({exc})") from exc
    run = raw.get("run")
    if isinstance(run, dict) and "name" not in run:
        run["name"] = path.stem
    elif run is None:
        raw["run"] = {"name": path.stem}
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    return recipe_from_dict(raw)


def parse_override(item: str) -> tuple[str, Any]:
    """`rollout.policy=history` -> ("rollout.policy", "history"); `train.lr=1e-3` -> 0.001."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"override: {item!r} is not KEY=VALUE (e.g. rollout.policy=history)")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()  # a bare word: `rollout.policy=history`
    return key, value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) < 2 or parts[0] not in _SECTIONS:
        raise RecipeError(
            f"{key}: unknown key; keys look like SECTION.NAME with SECTION one of "
            f"{', '.join(_SECTIONS)}"
        )
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"{key}: {part!r} is not a table")
        node = child
    node[parts[-1]] = value


def recipe_from_dict(raw: Mapping[str, Any]) -> Recipe:
    """Validates a nested dict (a parsed TOML recipe) into a Recipe; see the module docstring."""
    if not isinstance(raw, Mapping):
        raise RecipeError(f"recipe: expected a table, got {type(raw).__name__}")
    for section in raw:
        if section not in _SECTIONS:
            raise RecipeError(f"{section}: unknown section; known sections: {', '.join(_SECTIONS)}")
    built = {}
    for section, cls in _SECTIONS.items():
        table = raw.get(section, {})
        if not isinstance(table, Mapping):
            raise RecipeError(f"{section}: expected a table, got {type(table).__name__}")
        built[section] = cls(**_typed_fields(section, cls, table))
    recipe = Recipe(**built)
    _check_values(recipe)
    return recipe


def _typed_fields(prefix: str, cls: type, table: Mapping[str, Any]) -> dict[str, Any]:
    """Table entries checked against `cls`'s field types; ints are accepted for floats."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            raise RecipeError(f"{prefix}.{key}: unknown key; known keys: {', '.join(known)}")
        out[key] = _check_type(f"{prefix}.{key}", value, hints[key])
    return out


def _check_type(key: str, value: Any, expected: Any) -> Any:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(expected)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(key, value, option)
            except RecipeError:
                continue
        names = " or ".join(_type_name(o) for o in options if o is not type(None))
        raise RecipeError(f"{key}: expected {names}, got {_describe(value)}")
    if origin is dict or expected is dict:
        if not isinstance(value, Mapping):
            raise RecipeError(f"{key}: expected a table, got {_describe(value)}")
        return dict(value)
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RecipeError(f"{key}: expected a number, got {_describe(value)}")
        return float(value)
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{key}: expected an integer, got {_describe(value)}")
        return value
    if expected is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{key}: expected true or false, got {_describe(value)}")
        return value
    if expected is str:
        if not isinstance(value, str):
            raise RecipeError(f"{key}: expected a string, got {_describe(value)}")
        return value
    if expected is Any:
        return value
    raise AssertionError(f"recipe: no type check for {expected!r} ({key})")


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _check_values(recipe: Recipe) -> None:
    """Ranges and names; the first problem found is raised."""
    r = recipe
    if r.task.name not in TASKS:
        raise RecipeError(
            f"task.name: unknown task {r.task.name!r}; valid tasks: {', '.join(TASKS)}"
        )
    _check_task_options(r.task.name, r.task.options)
    if r.rollout.policy not in POLICIES:
        raise RecipeError(
            f"rollout.policy: {r.rollout.policy!r} is not one of {', '.join(POLICIES)}"
        )
    if r.rollout.engine not in ENGINE_KINDS:
        raise RecipeError(
            f"rollout.engine: {r.rollout.engine!r} is not one of {', '.join(ENGINE_KINDS)}"
        )
    if r.run.wandb_mode not in WANDB_MODES:
        raise RecipeError(
            f"run.wandb_mode: {r.run.wandb_mode!r} is not one of {', '.join(WANDB_MODES)}"
        )
    positive = {
        "task.train_size": r.task.train_size,
        "task.sft_size": r.task.sft_size,
        "model.hidden": r.model.hidden,
        "model.layers": r.model.layers,
        "model.heads": r.model.heads,
        "model.kv_heads": r.model.kv_heads,
        "model.max_positions": r.model.max_positions,
        "rollout.rollout_batch_size": r.rollout.rollout_batch_size,
        "rollout.n": r.rollout.n,
        "rollout.max_new_tokens": r.rollout.max_new_tokens,
        "rollout.max_running_requests": r.rollout.max_running_requests,
        "train.steps": r.train.steps,
        "train.sft_batch_size": r.train.sft_batch_size,
        "eval.every": r.eval.every,
        "eval.size": r.eval.size,
        "run.torch_threads": r.run.torch_threads,
        "train.lr": r.train.lr,
        "train.sft_lr": r.train.sft_lr,
        "rollout.temperature": r.rollout.temperature,
    }
    for key, value in positive.items():
        if not value > 0:
            raise RecipeError(f"{key}: must be > 0, got {value!r}")
    non_negative = {
        "train.sft_steps": r.train.sft_steps,
        "rollout.max_staleness": r.rollout.max_staleness,
        "model.intermediate": r.model.intermediate,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise RecipeError(f"{key}: must be >= 0, got {value!r}")
    if r.rollout.n < 2:
        raise RecipeError(f"rollout.n: GRPO needs at least 2 samples per prompt, got {r.rollout.n}")
    if r.rollout.tail_budget is not None and r.rollout.tail_budget < 1.0:
        raise RecipeError(f"rollout.tail_budget: must be >= 1.0, got {r.rollout.tail_budget!r}")
    if r.rollout.over_sampling < 1.0:
        raise RecipeError(f"rollout.over_sampling: must be >= 1.0, got {r.rollout.over_sampling!r}")
    if r.model.hidden % r.model.heads:
        raise RecipeError(
            f"model.heads: hidden ({r.model.hidden}) must be a multiple of heads ({r.model.heads})"
        )
    if (r.model.hidden // r.model.heads) % 2:
        raise RecipeError(
            f"model.heads: head dim hidden/heads = {r.model.hidden // r.model.heads} must be even "
            "(rotary embeddings)"
        )
    if r.model.heads % r.model.kv_heads:
        raise RecipeError(
            f"model.kv_heads: heads ({r.model.heads}) must be a multiple of kv_heads "
            f"({r.model.kv_heads})"
        )
    if not r.run.out_dir:
        raise RecipeError("run.out_dir: must not be empty")
    if r.run.name and (r.run.name.startswith(".") or "/" in r.run.name or "\\" in r.run.name):
        raise RecipeError(f"run.name: {r.run.name!r} must be a plain file name")
    if r.task.train_size < r.rollout.rollout_batch_size:
        raise RecipeError(
            f"task.train_size: {r.task.train_size} prompts cannot fill a rollout batch of "
            f"{r.rollout.rollout_batch_size}"
        )
    _check_problem_counts(r)


def _check_task_options(task: str, options: Mapping[str, Any]) -> None:
    config_cls = task_config_class(task)
    hints = typing.get_type_hints(config_cls)
    known = [f.name for f in dataclasses.fields(config_cls)]
    for key, value in options.items():
        if key not in known:
            raise RecipeError(
                f"task.options.{key}: unknown option of task {task!r}; valid options: "
                f"{', '.join(known)}"
            )
        _check_type(f"task.options.{key}", value, hints[key])
    try:
        config_cls(**options)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"task.options: {exc}") from exc


def _check_problem_counts(recipe: Recipe) -> None:
    """The task can supply as many distinct problems as asked (a few ms of generation)."""
    from rollout_accel.rollout.tasks import get_task

    task = get_task(recipe.task.name, **recipe.task.options)
    wanted = {
        "task.train_size": (recipe.task.train_size, task.train_prompts),
        "task.sft_size": (recipe.task.sft_size, task.train_prompts),
        "eval.size": (recipe.eval.size, task.eval_prompts),
    }
    for key, (count, generate) in wanted.items():
        try:
            generate(count, seed=0)
        except ValueError as exc:
            raise RecipeError(f"{key}: {exc}") from exc
