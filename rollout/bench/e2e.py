"""`rollout bench --scenario e2e`: the full stack with real generation, no length trace.

A policy whose outputs mean something — the local loop's SFT-warm-started toy model (a recipe of
`recipes/local/`, default the arithmetic task) — generates every response on the engine; lengths
end at the model's own EOS and rewards come from the task's checker. Each policy runs K rollout
steps on the same engine, the same weights (no training between steps, so every policy sees the
same model) and the same seeded prompt order, steps interleaved across policies (rotated) so a
drifting machine load hits all alike, each policy from an empty prefix cache. One table: step
time, ratio to sync, tokens/s, effective (non-zero-variance) groups/s and their share.

    rollout bench --scenario e2e                       # CPU, a few minutes
    rollout bench --scenario e2e --drafts              # speculative decoding from history drafts
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rollout_accel.rollout.bench.report import (
    COLUMNS,
    print_table,
    summarize,
    table_text,
    write_results,
)
from rollout_accel.rollout.bench.runner import PolicyRun, StepRecord
from rollout_accel.rollout.controller import RolloutController
from rollout_accel.rollout.controller_config import POLICIES, ControllerConfig
from rollout_accel.rollout.recipe import RecipeError, load_recipe

# The longtail table's columns (trace-only ones dropped) plus what the model wrote and earned.
E2E_COLUMNS = [c for c in COLUMNS if c[0] not in ("skip_rate", "discarded_tokens_per_step")] + [
    ("response_len_mean", "resp len", "{:.1f}"),
    ("reward_mean", "reward", "{:.2f}"),
    ("spec_accept_length", "acc/verify", "{:.2f}"),
]


@dataclass(frozen=True, slots=True)
class E2ESettings:
    """Every knob of an e2e run (printed into results.json)."""

    recipe: str
    policies: tuple[str, ...]
    steps: int
    rollout_batch_size: int
    n_samples_per_prompt: int
    max_new_tokens: int
    over_sampling: float
    temperature: float
    seed: int
    tail_budget: float | None
    drafts: bool
    model_path: str | None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rollout bench --scenario e2e", description=__doc__)
    p.add_argument("--recipe", default=None, help="local recipe (default arithmetic-sync.toml)")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset")
    p.add_argument("--steps", type=int, default=6, help="rollout steps per policy (default 6)")
    p.add_argument("--rollout-batch-size", type=int, default=32, help="groups per step")
    p.add_argument("--n-samples-per-prompt", type=int, default=8, help="samples per group")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the recipe's")
    p.add_argument("--over-sampling", type=float, default=1.5, help="default 1.5")
    p.add_argument("--temperature", type=float, default=1.0, help="default 1.0")
    p.add_argument("--seed", type=int, default=0, help="prompt order and SFT seed")
    p.add_argument(
        "--tail-budget", type=float, default=None, help="max-of-n tail for every policy (off)"
    )
    p.add_argument(
        "--drafts",
        action="store_true",
        help="speculative decoding from history drafts for every policy (needs engine support)",
    )
    p.add_argument(
        "--model-path",
        default=None,
        help="serve this model instead of the recipe's SFT toy policy (e.g. a calibrated GPU "
        "shape); its outputs are then not the task's, rewards mostly 0",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key (e.g. --set train.sft_steps=200)",
    )
    p.add_argument("--device", default=None, help="engine device (default: cuda if available)")
    p.add_argument("--out", default="bench-out-e2e", help="results.json, table.txt, SFT cache")
    return p


def _settings(args: argparse.Namespace, recipe: Any) -> E2ESettings:
    policies = tuple(x.strip() for x in args.policies.split(",") if x.strip())
    bad = [x for x in policies if x not in POLICIES]
    if bad or not policies:
        raise SystemExit(f"rollout bench: error: --policies: {bad[0] if bad else '(empty)'!r}")
    for name in ("steps", "rollout_batch_size", "n_samples_per_prompt"):
        if getattr(args, name) < 1:
            raise SystemExit(f"rollout bench: error: --{name.replace('_', '-')}: must be >= 1")
    return E2ESettings(
        recipe=str(args.recipe),
        policies=policies,
        steps=args.steps,
        rollout_batch_size=args.rollout_batch_size,
        n_samples_per_prompt=args.n_samples_per_prompt,
        max_new_tokens=args.max_new_tokens or recipe.rollout.max_new_tokens,
        over_sampling=args.over_sampling,
        temperature=args.temperature,
        seed=args.seed,
        tail_budget=args.tail_budget,
        drafts=args.drafts,
        model_path=args.model_path,
    )


def _config(policy: str, s: E2ESettings) -> ControllerConfig:
    return ControllerConfig(
        policy=policy,
        rollout_batch_size=s.rollout_batch_size,
        n_samples_per_prompt=s.n_samples_per_prompt,
        over_sampling=s.over_sampling,
        sampling_params={
            "temperature": s.temperature,
            "top_p": 1.0,
            "top_k": -1,
            "max_new_tokens": s.max_new_tokens,
        },
        seed=s.seed,
        tail_budget=s.tail_budget,
        drafts=s.drafts,
    )


async def run_e2e(s: E2ESettings, recipe: Any, out: Path, device: str | None) -> list[PolicyRun]:
    import torch

    from rollout_accel.rollout.bench.cli import require_drafts
    from rollout_accel.rollout.local.checkpoint import ensure_sft_checkpoint
    from rollout_accel.rollout.local.loop import prompt_items, task_reward
    from rollout_accel.rollout.pool import EnginePool, InProcessEngine
    from rollout_accel.rollout.prompts import ListPromptSource
    from rollout_accel.rollout.tasks import get_task
    from rollout_accel.sampling import AllocatorConfig, HistoryStore, PlannerConfig, RolloutPlanner
    from rollout_accel.serving.engine import Engine

    task = get_task(recipe.task.name, **recipe.task.options)
    problems = task.train_prompts(recipe.task.train_size, seed=s.seed)
    model_path = s.model_path
    if model_path is None:
        policy_dir, _ = ensure_sft_checkpoint(recipe, out / "sft-cache")
        model_path = str(policy_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine = Engine(
        model_path=model_path,
        device=device,
        dtype="float32" if device == "cpu" else "bfloat16",
        seed=s.seed,
        max_running_requests=512,
        speculative_algorithm="NGRAM" if s.drafts else None,
    )
    pool = EnginePool([InProcessEngine(engine, owns_engine=True)])
    try:
        if s.drafts:
            require_drafts(pool)
        with tempfile.TemporaryDirectory(prefix="rollout-e2e-") as tmp:
            controllers: list[tuple[str, RolloutController, PolicyRun]] = []
            for policy in s.policies:
                planner = None
                if policy == "history":
                    planner = RolloutPlanner(
                        HistoryStore(Path(tmp) / "history.db"),
                        PlannerConfig(allocator=AllocatorConfig(fixed_n=s.n_samples_per_prompt)),
                    )
                controllers.append(
                    (
                        policy,
                        RolloutController(
                            pool,
                            ListPromptSource(prompt_items(task, problems), seed=s.seed),
                            task_reward(task, problems),
                            _config(policy, s),
                            planner=planner,
                        ),
                        PolicyRun(policy),
                    )
                )
            # warm-up outside the measurement (first-call allocations)
            await controllers[0][1].pool.generate(
                {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 4}}
            )
            try:
                for step in range(s.steps):
                    shift = step % len(controllers)
                    for policy, ctl, run in controllers[shift:] + controllers[:shift]:
                        if step == 0:
                            await pool.flush_cache()
                        result = await ctl.step(step)
                        metrics = dict(result.metrics)
                        rewards = [float(x.reward) for g in result.groups for x in g]
                        metrics["rollout/raw_reward"] = sum(rewards) / max(len(rewards), 1)
                        run.steps.append(StepRecord(step, metrics, []))
                        print(
                            f"  {policy:8s} step {step}: {result.metrics['perf/rollout_time']:.2f}s",
                            flush=True,
                        )
            finally:
                for _, ctl, _ in controllers:
                    if ctl.planner is not None:
                        ctl.planner.store.close()
            return [run for _, _, run in controllers]
    finally:
        await pool.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.recipe is None:
        from rollout_accel.rollout.frontier import find_default_recipe

        args.recipe = str(find_default_recipe())
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as exc:
        raise SystemExit(f"rollout bench: error: {exc}") from None
    settings = _settings(args, recipe)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = asyncio.run(run_e2e(settings, recipe, out, args.device))
    rows = summarize(runs)
    for row, run in zip(rows, runs, strict=True):
        row["response_len_mean"] = run.mean("rollout/response_len/mean")
        row["reward_mean"] = run.mean("rollout/raw_reward")
        # "-" until the engine does speculative decoding (--drafts)
        row["spec_accept_length"] = run.mean("accel/spec_accept_length")
    import torch

    payload = {
        "schema": 1,
        "scenario": "e2e",
        "settings": asdict(settings),
        "task": recipe.task.name,
        "device": torch.cuda.get_device_name(0)
        if torch.cuda.is_available() and (args.device or "cuda").startswith("cuda")
        else "cpu",
        "summary": rows,
        "steps": {
            r.policy: [{"step": s.step, "metrics": s.metrics} for s in r.steps] for r in runs
        },
    }
    write_results(out / "results.json", payload)
    title = (
        f"rollout bench e2e: {recipe.task.name} ({'SFT toy policy' if not settings.model_path else settings.model_path}), "
        f"{settings.rollout_batch_size} groups x {settings.n_samples_per_prompt}, max_new_tokens "
        f"{settings.max_new_tokens}, {settings.steps} steps, drafts {'on' if settings.drafts else 'off'}"
    )
    (out / "table.txt").write_text(f"{title}\n{table_text(rows, E2E_COLUMNS)}\n")
    print_table(rows, title, E2E_COLUMNS)
    print(json.dumps({r["policy"]: round(r["speedup_vs_sync"], 3) for r in rows}))
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
