"""Runs each policy for K steps on the same engines and the same workload, steps interleaved.

Each policy starts from the same state: a fresh controller, an empty partial buffer, an empty
history store, the same seeded prompt order, and a flushed prefix cache at its first step.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rollout_accel.rollout.bench.workloads import SimulatedRollout, Workload
from rollout_accel.rollout.controller import RolloutController, StepOutput
from rollout_accel.rollout.controller_config import ControllerConfig
from rollout_accel.rollout.pool.base import EnginePool
from rollout_accel.rollout.prompts import ListPromptSource


@dataclass(frozen=True, slots=True)
class BenchSettings:
    """Every knob of a bench run (all printed into results.json)."""

    policies: tuple[str, ...] = ("sync", "dynamic", "partial", "history")
    steps: int = 8
    rollout_batch_size: int = 32
    n_samples_per_prompt: int = 8
    max_len: int = 256
    num_prompts: int = 128
    over_sampling: float = 1.5
    max_staleness: int = 1
    temperature: float = 1.0
    seed: int = 0
    history_filter: bool = False
    tail_budget: float | None = None  # the max-of-n tail setting, for every policy (off)
    drafts: bool = False  # speculative decoding from history, for every policy


@dataclass
class StepRecord:
    step: int
    metrics: dict[str, float]
    spans: list[dict[str, Any]]


@dataclass
class PolicyRun:
    policy: str
    steps: list[StepRecord] = field(default_factory=list)

    def mean(self, key: str, skip_first: bool = False) -> float:
        steps = self.steps[1:] if skip_first and len(self.steps) > 1 else self.steps
        values = [
            s.metrics[key] for s in steps if key in s.metrics and s.metrics[key] == s.metrics[key]
        ]
        return sum(values) / len(values) if values else float("nan")

    def total(self, key: str) -> float:
        return sum(s.metrics.get(key, 0.0) for s in self.steps)


def controller_config(policy: str, settings: BenchSettings) -> ControllerConfig:
    return ControllerConfig(
        policy=policy,
        rollout_batch_size=settings.rollout_batch_size,
        n_samples_per_prompt=settings.n_samples_per_prompt,
        over_sampling=settings.over_sampling,
        max_staleness=settings.max_staleness,
        dynamic_filter=settings.history_filter if policy == "history" else None,
        sampling_params={"temperature": settings.temperature, "max_new_tokens": settings.max_len},
        seed=settings.seed,
        tail_budget=settings.tail_budget,
        drafts=settings.drafts,
    )


def _spans(out: StepOutput) -> list[dict[str, Any]]:
    return [
        {
            "engine": s.engine,
            "start": s.start - out.start_time,
            "end": s.end - out.start_time,
            "finish": s.finish,
            "tokens": s.tokens,
        }
        for s in out.spans
    ]


@dataclass
class PolicyState:
    """One policy's controller and simulation, kept across the interleaved steps."""

    policy: str
    controller: RolloutController
    sim: SimulatedRollout
    run: PolicyRun


def _make_state(
    policy: str, pool: EnginePool, workload: Workload, settings: BenchSettings, workdir: Path
) -> PolicyState:
    sim = SimulatedRollout(workload, settings.max_len)
    planner = None
    if policy == "history":
        from rollout_accel.sampling import (
            AllocatorConfig,
            HistoryStore,
            PlannerConfig,
            RolloutPlanner,
        )

        store = HistoryStore(workdir / f"history-{policy}.db")
        planner = RolloutPlanner(
            store, PlannerConfig(allocator=AllocatorConfig(fixed_n=settings.n_samples_per_prompt))
        )
    controller = RolloutController(
        pool,
        ListPromptSource(workload.items(), seed=settings.seed),
        sim.reward,
        controller_config(policy, settings),
        planner=planner,
        payload_hook=sim.payload_hook,
    )
    return PolicyState(policy, controller, sim, PolicyRun(policy))


async def _step(
    state: PolicyState,
    pool: EnginePool,
    step: int,
    settings: BenchSettings,
    on_step: Callable[[str, int, dict[str, float]], None] | None,
) -> None:
    if step == 0:
        # Each policy starts from an empty prefix cache. Later steps keep it: a resumed partial
        # sample hits its own prefix, as in a real run; what policies could share is the prompt
        # (a few tokens here), not their sampled responses.
        await pool.flush_cache()
    state.sim.step = step
    out = await state.controller.step(step)
    if len(out.groups) != settings.rollout_batch_size:
        raise RuntimeError(f"{state.policy}: step {step} returned {len(out.groups)} groups")
    state.run.steps.append(StepRecord(step, out.metrics, _spans(out)))
    if on_step is not None:
        on_step(state.policy, step, out.metrics)


async def run_policy(
    policy: str,
    pool: EnginePool,
    workload: Workload,
    settings: BenchSettings,
    workdir: Path,
    on_step: Callable[[str, int, dict[str, float]], None] | None = None,
) -> PolicyRun:
    """One policy's K steps in a row."""
    state = _make_state(policy, pool, workload, settings, workdir)
    try:
        for step in range(settings.steps):
            await _step(state, pool, step, settings, on_step)
    finally:
        _close(state)
    return state.run


def _close(state: PolicyState) -> None:
    if state.controller.planner is not None:
        state.controller.planner.store.close()


async def run_bench(
    pool: EnginePool,
    workload: Workload,
    settings: BenchSettings,
    on_step: Callable[[str, int, dict[str, float]], None] | None = None,
) -> list[PolicyRun]:
    """Every policy K steps, interleaved: step k of each policy (in an order rotated by one per
    step) before step k+1 of any, so a drifting machine load (a shared CPU) hits every policy
    alike. Each policy keeps its own controller, buffer and history throughout."""
    with tempfile.TemporaryDirectory(prefix="rollout-bench-") as tmp:
        # Warm-up outside the measurement: first-call costs (allocations, kernel selection).
        warm = BenchSettings(
            policies=("sync",),
            steps=1,
            rollout_batch_size=2,
            n_samples_per_prompt=2,
            max_len=16,
            num_prompts=settings.num_prompts,
            seed=settings.seed + 1,
        )
        await run_policy("sync", pool, workload, warm, Path(tmp))
        states = [_make_state(p, pool, workload, settings, Path(tmp)) for p in settings.policies]
        try:
            for step in range(settings.steps):
                shift = step % len(states)
                for state in states[shift:] + states[:shift]:
                    await _step(state, pool, step, settings, on_step)
        finally:
            for state in states:
                _close(state)
        return [s.run for s in states]
