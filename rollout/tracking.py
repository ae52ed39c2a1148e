"""Experiment tracking: W&B with slime's metric layout, plus a JSONL file that is always written.

slime logs rollout metrics against `rollout/step`, trainer metrics against `train/step` and eval
metrics against `eval/step` (W&B `define_metric`); we keep those names and axes, so local runs,
`rollout bench` and slime runs overlay in one W&B project. Each `log` call writes one JSON line
(`metrics.jsonl`) whatever W&B does, and works without wandb installed.

W&B mode: an explicit `offline` / `online` / `disabled` wins; `auto` (or None) follows
WANDB_MODE when set, else `online` when WANDB_API_KEY is set, else `offline` — so nothing
leaves the machine unless the user asked for it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

# (metric glob, its x axis): slime's layout, plus our accel/* and the local loop's time/*.
STEP_AXES: tuple[tuple[str, str], ...] = (
    ("train/*", "train/step"),
    ("rollout/*", "rollout/step"),
    ("perf/*", "rollout/step"),
    ("accel/*", "rollout/step"),
    ("time/*", "rollout/step"),
    ("passrate/*", "rollout/step"),
    ("eval/*", "eval/step"),
)
STEP_KEYS = ("rollout/step", "train/step", "eval/step")
WANDB_MODES = ("offline", "online", "disabled")


def resolve_wandb_mode(mode: str | None = None) -> str:
    """The W&B mode to use; see the module docstring. Raises ValueError for an unknown mode."""
    if mode in (None, "auto"):
        env = os.environ.get("WANDB_MODE", "").strip().lower()
        if env in ("offline", "dryrun"):
            return "offline"
        if env in ("online", "run"):
            return "online"
        if env == "disabled":
            return "disabled"
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    if mode not in WANDB_MODES:
        raise ValueError(f"wandb mode: {mode!r} is not one of auto, {', '.join(WANDB_MODES)}")
    return mode


def wandb_available() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; null reads back unambiguously
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):  # numpy / torch scalars
        return _jsonable(value.item())
    return str(value)


def _reinit_value(version: str) -> str | bool:
    """`create_new` (wandb >= 0.19): our run must not finish a run the caller already has
    open, e.g. slime's; older wandb only knows `reinit=True`."""
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return "create_new"
    return "create_new" if (major, minor) >= (0, 19) else True


class Tracker:
    """Logs metric dicts to `<out_dir>/metrics.jsonl` and (unless disabled) to a W&B run.

    `log(metrics, step=k)` stamps `rollout/step`, `train/step` and `eval/step` = k unless the
    dict has them already. W&B files go under `<out_dir>/wandb/`. Use as a context manager, or
    call `finish()`; after it, `log` raises.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        project: str = "rollout-accel",
        name: str | None = None,
        group: str | None = None,
        config: Mapping[str, Any] | None = None,
        mode: str | None = "auto",
        jsonl_name: str = "metrics.jsonl",
    ) -> None:
        self.mode = resolve_wandb_mode(mode)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.out_dir / jsonl_name
        self._jsonl = self.jsonl_path.open("a", encoding="utf-8")
        self.note: str | None = None
        self._run: Any = None
        self._closed = False
        if self.mode != "disabled":
            if wandb_available():
                try:
                    self._run = self._start_wandb(project, name, group, config)
                except BaseException:
                    self._jsonl.close()
                    raise
            else:
                self.note = "wandb is not installed; logging to JSONL only"
                self.mode = "disabled"

    def _start_wandb(
        self,
        project: str,
        name: str | None,
        group: str | None,
        config: Mapping[str, Any] | None,
    ) -> Any:
        import wandb

        wandb_dir = self.out_dir / "wandb"
        wandb_dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=project,
            name=name,
            group=group,
            config=_jsonable(dict(config or {})),
            dir=str(self.out_dir),
            mode=self.mode,
            reinit=_reinit_value(wandb.__version__),
            settings=wandb.Settings(
                silent=True,
                console="off",
                disable_git=True,
                save_code=False,
                x_disable_stats=True,
                x_disable_machine_info=True,
            ),
        )
        for key in STEP_KEYS:
            run.define_metric(key)
        for pattern, axis in STEP_AXES:
            run.define_metric(pattern, step_metric=axis)
        return run

    @property
    def wandb_run(self) -> Any:
        """The live `wandb.Run`, or None when W&B is off."""
        return self._run

    @property
    def wandb_dir(self) -> Path | None:
        """The run's own W&B directory (`.../wandb/offline-run-...`), or None when off."""
        if self._run is None:
            return None
        return Path(self._run.dir).parent

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """One record: a JSON line, and a `wandb.log` of its numeric entries."""
        if self._closed:
            raise RuntimeError("Tracker.log after finish()")
        record = dict(metrics)
        if step is not None:
            for key in STEP_KEYS:
                record.setdefault(key, step)
        self._jsonl.write(json.dumps(_jsonable(record)) + "\n")
        self._jsonl.flush()
        if self._run is not None:
            numeric = {
                k: v
                for k, v in record.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
            self._run.log(numeric)

    def summary(self, values: Mapping[str, Any]) -> None:
        """Final numbers of the run (W&B run summary; the JSONL gets a `summary` record)."""
        self._jsonl.write(json.dumps({"summary": _jsonable(dict(values))}) + "\n")
        self._jsonl.flush()
        if self._run is not None:
            self._run.summary.update(_jsonable(dict(values)))

    def finish(self, exit_code: int = 0) -> None:
        """Closes the JSONL file and the W&B run. Offline run files are completed by W&B's
        service process, which may lag this call by a moment on a busy machine."""
        if self._closed:
            return
        self._closed = True
        self._jsonl.close()
        if self._run is not None:
            self._run.finish(exit_code=exit_code)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)
