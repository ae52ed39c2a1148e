"""The local RL loop: SFT warm start, then rollout -> reward -> GRPO step -> weight push, on CPU.

Walk of one run (`run_recipe`):
  1. SFT checkpoint from the cache (built on a miss), loaded twice: the engine serves it, the
     trainer trains its own float32 copy;
  2. per RL step k: `controller.step(k)` returns `rollout_batch_size` accepted groups (the
     policy decides how: sync / dynamic / partial / history) with rewards from the task;
     `GRPOTrainer.train_step` (loss_mask honoured: off-policy tokens of resumed partial rollouts
     stay out of the loss when `mask_offpolicy`); the new weights are pushed to the engine
     (in-process, or through the server's /update_weights_from_tensor) as weight_version k+1;
  3. greedy held-out accuracy through the same engine at step 0, every `eval.every` steps and
     after the last step.
Wall time (`time/wall`) counts rollout + train + push only: eval and SFT are measurement and
set-up, identical for every policy, so time-to-accuracy compares what the policies change.
Outputs go to a hidden staging directory and are renamed to `recipe.run_dir` only when the run
has finished, so a run directory is never half-written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rollout_accel.rollout.controller import RolloutController
from rollout_accel.rollout.controller_config import ControllerConfig
from rollout_accel.rollout.local.checkpoint import (
    ensure_sft_checkpoint,
    load_policy,
    named_weights,
    staging_dir,
)
from rollout_accel.rollout.local.evaluation import EvalResult, evaluate
from rollout_accel.rollout.pool import EnginePool, HttpEngine, InProcessEngine
from rollout_accel.rollout.prompts import ListPromptSource, PromptItem
from rollout_accel.rollout.recipe import Recipe
from rollout_accel.rollout.sample_types import Sample
from rollout_accel.rollout.tasks import Problem, Task, get_task
from rollout_accel.rollout.tracking import Tracker
from rollout_accel.rollout.trainer import GRPOConfig, GRPOTrainer, TrainSample
from rollout_accel.serving.engine import Engine

SFT_CACHE = "sft-cache"
# Per-step numbers whose run means go into summary.json (what a policy comparison reads).
_STEP_MEANS = (
    "time/rollout",
    "time/train",
    "time/push",
    "accel/generated_tokens",
    "accel/effective_groups",
    "accel/filtered_groups",
    "accel/skip_rate",
    "accel/aborted_tokens",
    "accel/discarded_tokens",
    "rollout/raw_reward",
    "rollout/response_len/mean",
    "train/forwarded_samples",
)


@dataclass(slots=True)
class EvalPoint:
    """One held-out evaluation: after `step` RL steps, at `wall` seconds of RL wall time and
    `cpu` seconds of this process's CPU time spent in RL (a contention-robust cost measure)."""

    step: int
    wall: float
    cpu: float
    accuracy: float


@dataclass(slots=True)
class RunResult:
    """What a finished run reports; `summary` is also `run_dir/summary.json`."""

    run_dir: Path
    summary: dict[str, Any]
    evals: list[EvalPoint] = field(default_factory=list)


# -- pieces (also used by tests and the frontier experiment) ------------------------------------


def prompt_items(task: Task, problems: Sequence[Problem]) -> list[PromptItem]:
    """Controller prompts: key = problem key, ids = `task.encode_prompt`, label = answer."""
    return [
        PromptItem(
            key=p.key,
            prompt_ids=task.encode_prompt(p),
            label=p.answer,
            prompt_text=p.prompt,
            metadata={"difficulty": p.difficulty},
        )
        for p in problems
    ]


def task_reward(task: Task, problems: Sequence[Problem]):
    """An async reward for the controller: `task.reward` on the decoded response tokens.

    Decodes `tokens[prompt_length:]` (not `sample.response`), so a response assembled from
    several partial-rollout segments is scored on exactly the tokens that will be trained on.
    """
    by_key = {p.key: p for p in problems}

    async def reward(sample: Sample) -> float:
        problem = by_key[sample.metadata["prompt_key"]]
        response = sample.tokens[sample.metadata["prompt_length"] :]
        return task.reward(problem, task.tokenizer.decode(response))

    return reward


def train_groups(groups: Sequence[Sequence[Sample]]) -> list[list[TrainSample]]:
    """Controller groups as trainer input; prompt/response split at `metadata["prompt_length"]`."""
    out = []
    for group in groups:
        batch = []
        for s in group:
            cut = s.metadata["prompt_length"]
            batch.append(
                TrainSample(
                    prompt_ids=list(s.tokens[:cut]),
                    response_ids=list(s.tokens[cut:]),
                    rollout_logprobs=list(s.rollout_log_probs or []),
                    reward=float(s.reward),
                    loss_mask=list(s.loss_mask or []),
                )
            )
        out.append(batch)
    return out


def build_engine(policy_dir: str | Path, recipe: Recipe) -> Engine:
    """The CPU engine serving `policy_dir`, its weights tagged version "0"."""
    rollout = recipe.rollout
    return Engine(
        model_path=str(policy_dir),
        device="cpu",
        dtype="float32",
        seed=recipe.run.seed,
        max_running_requests=rollout.max_running_requests,
        weight_version="0",
    )


async def push_weights(pool: EnginePool, model: torch.nn.Module, version: int | str) -> None:
    """Sends every parameter to every engine of the pool (in place, prefix cache flushed)."""
    await pool.update_weights_from_tensor(named_weights(model), weight_version=str(version))


def controller_config(recipe: Recipe) -> ControllerConfig:
    r = recipe.rollout
    return ControllerConfig(
        policy=r.policy,
        rollout_batch_size=r.rollout_batch_size,
        n_samples_per_prompt=r.n,
        over_sampling=r.over_sampling,
        max_staleness=r.max_staleness,
        mask_offpolicy=r.mask_offpolicy,
        dynamic_filter=r.dynamic_filter,
        tail_budget=r.tail_budget,
        sampling_params={
            "temperature": r.temperature,
            "top_p": 1.0,
            "top_k": -1,
            "max_new_tokens": r.max_new_tokens,
        },
        seed=recipe.run.seed,
    )


def make_planner(recipe: Recipe, history_path: Path) -> Any:
    """The history policy's planner (fixed n per prompt, the recipe's); None for other policies."""
    if recipe.rollout.policy != "history":
        return None
    from rollout_accel.sampling import AllocatorConfig, HistoryStore, PlannerConfig, RolloutPlanner

    store = HistoryStore(history_path)
    return RolloutPlanner(store, PlannerConfig(allocator=AllocatorConfig(fixed_n=recipe.rollout.n)))


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Intra-op threads for the run. Tiny matmuls gain nothing from threads, and the engine
    thread and the trainer share the cores; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- the run ------------------------------------------------------------------------------------


class _Progress:
    """A rich progress bar over RL steps (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, label: str) -> None:
        self._bar = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            transient=False,
        )
        self._task = self._bar.add_task(label, total=total, info="")
        self._bar.start()

    def update(self, advance: int, info: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=advance, info=info)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def run_recipe(recipe: Recipe, progress: bool = True) -> RunResult:
    """Runs one recipe to completion; outputs in `recipe.run_dir` (see the module docstring)."""
    out_root = Path(recipe.run.out_dir)
    out_root.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(out_root, f".{recipe.run_name}.tmp-")
    try:
        with torch_threads(recipe.run.torch_threads):
            summary, evals = asyncio.run(_run(recipe, staging, progress))
    except BaseException:
        failed = out_root / f".{recipe.run_name}.failed"
        shutil.rmtree(failed, ignore_errors=True)
        os.replace(staging, failed)  # kept for debugging, hidden and named as failed
        raise
    target = recipe.run_dir
    summary["run_dir"] = str(target)
    (staging / "summary.json").write_text(json.dumps(summary, indent=2))
    _publish(staging, target)
    return RunResult(target, summary, evals)


def _publish(staging: Path, target: Path) -> None:
    """Renames the finished staging directory to `target`, replacing an older run there."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


async def _run(recipe: Recipe, staging: Path, progress: bool) -> tuple[dict, list[EvalPoint]]:
    task = get_task(recipe.task.name, **recipe.task.options)
    train_problems = task.train_prompts(recipe.task.train_size, seed=recipe.run.seed)
    eval_problems = task.eval_prompts(recipe.eval.size, seed=recipe.eval.seed)
    sft_dir, sft_meta = ensure_sft_checkpoint(recipe, Path(recipe.run.out_dir) / SFT_CACHE)
    (staging / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2))

    async with contextlib.AsyncExitStack() as stack:
        # Unwound in reverse order, also when set-up fails half-way.
        engine = build_engine(sft_dir, recipe)
        stack.callback(engine.shutdown)
        if recipe.rollout.engine == "http":
            from rollout_accel.serving.server import ServerThread

            server = ServerThread(engine=engine).start()
            stack.callback(server.stop)
            pool = EnginePool([HttpEngine(server.url)])
        else:
            pool = EnginePool([InProcessEngine(engine)])
        stack.push_async_callback(pool.close)
        planner = make_planner(recipe, staging / "history.db")
        if planner is not None:
            stack.callback(planner.store.close)
        tracker = Tracker(
            staging,
            project=recipe.run.wandb_project,
            name=recipe.run_name,
            group=recipe.run.name or None,
            config=recipe.to_dict(),
            mode=recipe.run.wandb_mode,
        )
        stack.push(lambda exc_type, *_: tracker.finish(exit_code=int(exc_type is not None)))
        label = f"{recipe.run_name} [{recipe.rollout.policy}]"
        bar = _Progress(progress, recipe.train.steps, label)
        stack.callback(bar.close)
        return await _train(
            recipe,
            task,
            train_problems,
            eval_problems,
            pool,
            planner,
            tracker,
            bar,
            sft_dir,
            sft_meta,
        )


async def _train(
    recipe: Recipe,
    task: Task,
    train_problems: list[Problem],
    eval_problems: list[Problem],
    pool: EnginePool,
    planner: Any,
    tracker: Tracker,
    bar: _Progress,
    policy_dir: Path,
    sft_meta: dict,
) -> tuple[dict, list[EvalPoint]]:
    steps, every = recipe.train.steps, recipe.eval.every
    model = load_policy(policy_dir)
    trainer = GRPOTrainer(
        model,
        GRPOConfig(
            lr=recipe.train.lr,
            temperature=recipe.rollout.temperature,
            pad_id=task.tokenizer.pad_id,
        ),
    )
    controller = RolloutController(
        pool,
        ListPromptSource(prompt_items(task, train_problems), seed=recipe.run.seed),
        task_reward(task, train_problems),
        controller_config(recipe),
        planner=planner,
    )
    evals: list[EvalPoint] = []

    async def run_eval(step: int, wall: float, cpu: float) -> EvalResult:
        result = await evaluate(pool, task, eval_problems, recipe.rollout.max_new_tokens)
        evals.append(EvalPoint(step, wall, cpu, result.accuracy))
        return result

    started = time.perf_counter()
    first = await run_eval(0, 0.0, 0.0)
    tracker.log({**first.metrics(), "time/wall": 0.0, "time/cpu": 0.0, "time/elapsed": 0.0}, step=0)
    wall = cpu = 0.0
    rewards: list[float] = []
    generated = 0.0
    per_step: dict[str, list[float]] = {k: [] for k in _STEP_MEANS}
    last_eval = first
    for step in range(steps):
        c0, t0 = time.process_time(), time.perf_counter()
        out = await controller.step(step)
        t1 = time.perf_counter()
        train_metrics = trainer.train_step(train_groups(out.groups))
        t2 = time.perf_counter()
        await push_weights(pool, model, step + 1)
        t3 = time.perf_counter()
        wall += t3 - t0
        cpu += time.process_time() - c0
        reward = statistics.fmean(float(s.reward) for g in out.groups for s in g)
        rewards.append(reward)
        generated += out.metrics.get("accel/generated_tokens", 0.0)
        record: dict[str, Any] = dict(out.metrics)
        record.update({f"train/{k}": v for k, v in train_metrics.items()})
        record.update(
            {
                "rollout/raw_reward": reward,
                "time/rollout": t1 - t0,
                "time/train": t2 - t1,
                "time/push": t3 - t2,
                "time/step": t3 - t0,
                "time/wall": wall,
                "time/cpu": cpu,
            }
        )
        done = step + 1
        if done % every == 0 or done == steps:
            last_eval = await run_eval(done, wall, cpu)
            record.update(last_eval.metrics())
        record["time/elapsed"] = time.perf_counter() - started
        for key in _STEP_MEANS:
            value = record.get(key)
            if isinstance(value, int | float):
                per_step[key].append(float(value))
        # Rollout k's metrics and the eval after train step k+1 share one record: the x axes
        # are rollout/step = k and train/step = eval/step = k + 1 (weights after k+1 updates).
        tracker.log(record | {"rollout/step": step, "train/step": done, "eval/step": done})
        bar.update(1, f"reward {reward:.2f}  eval {last_eval.accuracy:.3f}  wall {wall:.0f}s")
    summary = {
        "run_name": recipe.run_name,
        "policy": recipe.rollout.policy,
        "seed": recipe.run.seed,
        "steps": steps,
        "initial_eval_accuracy": evals[0].accuracy,
        "final_eval_accuracy": evals[-1].accuracy,
        "best_eval_accuracy": max(e.accuracy for e in evals),
        "rl_wall_seconds": wall,
        "rl_cpu_seconds": cpu,
        "elapsed_seconds": time.perf_counter() - started,
        "mean_step_seconds": wall / max(steps, 1),
        "mean_rollout_reward": statistics.fmean(rewards) if rewards else None,
        "generated_tokens": generated,
        "step_means": {k: statistics.fmean(v) for k, v in per_step.items() if v},
        "sft_cached": bool(sft_meta.get("cached")),
        "sft_seconds": sft_meta.get("seconds"),
        "sft_final_loss": (sft_meta.get("losses") or [None])[-1],
        "evals": [
            {"step": e.step, "wall": e.wall, "cpu": e.cpu, "accuracy": e.accuracy} for e in evals
        ],
        "wandb_mode": tracker.mode,
    }
    tracker.summary({k: v for k, v in summary.items() if k != "evals"})
    return summary, evals
