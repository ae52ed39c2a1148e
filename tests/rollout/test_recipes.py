"""The slime recipes: every rollout_accel path they name resolves with the signature slime calls,
and accel.yaml, combined with each script's flags, passes the plugin's settings validator."""

from __future__ import annotations

import importlib
import inspect
import re
import shlex
import subprocess
from argparse import Namespace
from pathlib import Path
from typing import Any

import pytest
import yaml

from rollout_accel.rollout.slime_settings import (
    ACCEL_KEYS,
    load_custom_config,
    settings_from_args,
    settings_table,
)

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "slime"
SCRIPTS = sorted(RECIPES.glob("*.sh"))
YAMLS = sorted(RECIPES.glob("*.yaml"))
DOTTED = re.compile(r"rollout_accel(?:\.[A-Za-z_]\w*)+")


def _resolve(path: str) -> Any:
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _script_flags(script: Path) -> dict[str, list[str]]:
    """`--flag value...` pairs of a slime launch script (comments dropped; bash expansions kept
    as text)."""
    lines = [line.split(" #", 1)[0] for line in script.read_text().splitlines()]
    tokens = shlex.split("\n".join(line for line in lines if not line.lstrip().startswith("#")))
    flags: dict[str, list[str]] = {}
    current: str | None = None
    for token in tokens:
        if token.startswith("--") and len(token) > 2 and "=" not in token:
            current = token[2:]
            flags[current] = []
        elif token == ")" or re.match(r"^[A-Z_]+=", token):  # end of an array, an assignment
            current = None
        elif current is not None and token != "\\":
            flags[current].append(token)
    return flags


def _value(values: list[str]) -> Any:
    if not values:
        return True
    if len(values) > 1:
        return values
    for kind in (int, float):
        try:
            return kind(values[0])
        except ValueError:
            pass
    return values[0]


def _args_from(script: Path, config: dict[str, Any]) -> Namespace:
    """slime's args as the script + YAML would make them (router address set at run time)."""
    args = {name.replace("-", "_"): _value(v) for name, v in _script_flags(script).items()}
    args.update(sglang_router_ip="127.0.0.1", sglang_router_port=30000)
    args.update(config)
    return Namespace(**args)


def _check_rollout_fn(fn: Any) -> None:
    sig = inspect.signature(fn)
    assert tuple(sig.parameters) == ("args", "rollout_id", "data_source", "evaluation")
    assert sig.parameters["evaluation"].default is False


def _check_data_source(cls: Any) -> None:
    assert inspect.isclass(cls)
    assert tuple(inspect.signature(cls.__init__).parameters) == ("self", "args")
    for name in ("get_samples", "add_samples", "save", "load", "__len__"):
        assert callable(getattr(cls, name, None)), name
    assert inspect.signature(cls.load).parameters["rollout_id"].default is None


def _check_filter(fn: Any) -> None:
    params = inspect.signature(fn).parameters
    assert tuple(params)[:2] == ("args", "samples")
    assert any(p.kind == p.VAR_KEYWORD for p in params.values())


CHECKS = {
    "rollout-function-path": _check_rollout_fn,
    "eval-function-path": _check_rollout_fn,
    "data-source-path": _check_data_source,
    "dynamic-sampling-filter-path": _check_filter,
}


def test_recipes_exist() -> None:
    names = {p.name for p in SCRIPTS}
    assert {"run-qwen3-4B-accel.sh", "run-qwen3-8B-accel.sh"} <= names
    assert (RECIPES / "accel.yaml").is_file() and (RECIPES / "README.md").is_file()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_paths_resolve_with_slime_signatures(script: Path) -> None:
    flags = _script_flags(script)
    named = set(DOTTED.findall(script.read_text()))
    assert named, "the recipe uses no rollout_accel plugin"
    checked = set()
    for flag, check in CHECKS.items():
        for value in flags.get(flag, []):
            if value.startswith("rollout_accel."):
                check(_resolve(value))
                checked.add(value)
    assert named == checked, f"paths outside a known slime flag: {named - checked}"
    for flag in ("rollout-function-path", "data-source-path", "dynamic-sampling-filter-path"):
        assert flags[flag][0].startswith("rollout_accel."), flag
    assert flags["custom-config-path"] == ["${ACCEL_CONFIG}"]
    assert 'ACCEL_CONFIG=${ACCEL_CONFIG:-"${SCRIPT_DIR}/accel.yaml"}' in script.read_text()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_shell_syntax(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_yaml_with_script_flags_passes_the_validator(script: Path) -> None:
    config = load_custom_config(RECIPES / "accel.yaml")
    settings = settings_from_args(_args_from(script, config))
    c = settings.controller
    assert (c.rollout_batch_size, c.n_samples_per_prompt) == (32, 8)
    assert c.sampling_params["max_new_tokens"] == 8192
    assert c.policy == config["accel_policy"] == "history"
    assert c.over_sampling == 48 / 32  # from --over-sampling-batch-size
    assert c.mask_offpolicy is True  # --mask-offpolicy-in-partial-rollout
    assert settings.planner is not None and settings.planner.allocator.fixed_n == 8
    assert settings.dynamic_filter_path == "rollout_accel.rollout.slime.nonzero_std_filter"


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_yaml_paths_resolve(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    for key, value in config.items():
        values = value if isinstance(value, list) else [value]
        for item in values:
            if isinstance(item, str) and item.startswith("rollout_accel."):
                fn = _resolve(item)
                assert callable(fn), f"{key}: {item}"


def test_yaml_sets_every_key_and_readme_documents_them() -> None:
    config = yaml.safe_load((RECIPES / "accel.yaml").read_text())
    assert set(config) == {k.name for k in ACCEL_KEYS}
    readme = (RECIPES / "README.md").read_text()
    assert settings_table() in readme
    for policy in ("sync", "dynamic", "partial", "history"):
        assert f"- `{policy}`" in readme
