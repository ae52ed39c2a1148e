"""Benchmark workloads: what prompts exist, how long each response is, and what it earns.

`synthetic-longtail` is a trace-shaped simulation on a real engine: the seeded trace
(`rollout_accel.sampling.SyntheticLongtailTrace`, shaped after published math-RL runs and fixed)
decides each response's length and reward; the engine really generates that many tokens (it is
told through max_new_tokens + ignore_eos), the controller is not told anything — it sees lengths
only as they happen and rewards only at completion, as with a real policy and verifier.

`trace:FILE` replays a JSONL trace with the same mechanics. One JSON object per line:
    {"prompt": "p17", "step": 3, "lengths": [812, 95, ...], "rewards": [1, 0, ...],
     "prompt_ids": [...]}            # prompt_ids optional (else "prompt_len": N, default 64)
    optional "truncated": [false, true, ...]
A (prompt, step) asked for but not recorded uses that prompt's nearest recorded step; sample i of
a group takes entry i modulo the recorded group size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from rollout_accel.rollout.prompts import PromptItem
from rollout_accel.rollout.sample_types import Sample


class WorkloadError(ValueError):
    """A workload that cannot be built (bad name, unreadable or malformed trace)."""


@dataclass(frozen=True, slots=True)
class Draw:
    length: int
    reward: float
    truncated: bool


class Workload(Protocol):
    name: str

    def items(self) -> list[PromptItem]: ...

    def draw_group(self, key: str, step: int, n: int) -> list[Draw]: ...

    def describe(self) -> dict[str, Any]: ...


class SimulatedRollout:
    """Binds a workload to a run: the payload hook and the reward for the controller.

    A group's draws are fixed the first time any of its samples is dispatched (at that step), so a
    resumed straggler keeps its length; `step` must be set before each controller step.
    """

    def __init__(self, workload: Workload, max_len: int) -> None:
        self.workload = workload
        self.max_len = max_len
        self.step = 0

    def _draw(self, sample: Sample) -> Draw:
        if "simulated_length" not in sample.metadata:
            key = sample.metadata["prompt_key"]
            n = int(sample.metadata.get("group_size", 1))
            draws = self.workload.draw_group(key, self.step, n)
            draw = draws[sample.metadata.get("index_in_group", 0) % len(draws)]
            sample.metadata["simulated_length"] = min(draw.length, self.max_len)
            sample.metadata["simulated_reward"] = draw.reward
            sample.metadata["simulated_truncated"] = draw.truncated or draw.length >= self.max_len
        return Draw(
            sample.metadata["simulated_length"],
            sample.metadata["simulated_reward"],
            sample.metadata["simulated_truncated"],
        )

    def payload_hook(self, sample: Sample, payload: dict[str, Any]) -> dict[str, Any]:
        draw = self._draw(sample)
        params = dict(payload["sampling_params"])
        params["max_new_tokens"] = max(
            1, min(params["max_new_tokens"], draw.length - sample.response_length)
        )
        params["ignore_eos"] = True
        return {**payload, "sampling_params": params}

    async def reward(self, sample: Sample) -> float:
        # A sample cut by the tail budget never reached its answer: graded as a truncation.
        if sample.metadata.get("tail_cut"):
            return 0.0
        return float(self._draw(sample).reward)


class SyntheticLongtail:
    """The fixed synthetic trace at a CPU-friendly scale (`max_len` rescales all lengths)."""

    name = "synthetic-longtail"

    def __init__(
        self,
        num_prompts: int,
        n: int,
        max_len: int,
        seed: int,
        vocab_size: int,
        horizon_steps: int = 96,
    ) -> None:
        from rollout_accel.sampling import SyntheticLongtailTrace

        self.trace = SyntheticLongtailTrace(
            num_prompts=num_prompts,
            n_per_prompt=n,
            max_len=max_len,
            seed=seed,
            horizon_steps=horizon_steps,
            vocab_size=vocab_size,
        )
        self.num_prompts = num_prompts

    def items(self) -> list[PromptItem]:
        return [
            PromptItem(str(p), [int(t) for t in self.trace.prompt_tokens(p)])
            for p in range(self.num_prompts)
        ]

    def draw_group(self, key: str, step: int, n: int) -> list[Draw]:
        group = self.trace.draw_group(int(key), step, n)
        return [
            Draw(int(length), float(reward), bool(trunc))
            for length, reward, trunc in zip(
                group.lengths, group.rewards, group.truncated, strict=True
            )
        ]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **{k: _plain(v) for k, v in self.trace.describe().items()}}


class TraceReplay:
    """Replays a JSONL trace (format in the module docstring)."""

    name = "trace"

    def __init__(self, path: str | Path, vocab_size: int) -> None:
        path = Path(path)
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise WorkloadError(f"trace: cannot read {str(path)!r} ({exc.strerror})") from exc
        self.path = path
        self.records: dict[str, dict[int, dict[str, Any]]] = {}
        self.prompt_ids: dict[str, list[int]] = {}
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise WorkloadError(f"trace {path.name}:{number}: not JSON ({exc.msg})") from exc
            self._check(rec, f"trace {path.name}:{number}", vocab_size)
            key = str(rec["prompt"])
            self.records.setdefault(key, {})[int(rec.get("step", 0))] = rec
            if key not in self.prompt_ids:
                ids = rec.get("prompt_ids")
                if ids is None:
                    rng = np.random.default_rng(abs(hash(key)) % 2**32)
                    ids = rng.integers(16, vocab_size, int(rec.get("prompt_len", 64))).tolist()
                self.prompt_ids[key] = [int(t) for t in ids]
        if not self.records:
            raise WorkloadError(f"trace {path.name}: no records")

    @staticmethod
    def _check(rec: Any, where: str, vocab_size: int) -> None:
        if not isinstance(rec, dict):
            raise WorkloadError(f"{where}: expected a JSON object")
        for field in ("prompt", "lengths", "rewards"):
            if field not in rec:
                raise WorkloadError(f"{where}: missing field {field!r}")
        lengths, rewards = rec["lengths"], rec["rewards"]
        if (
            not isinstance(lengths, list)
            or not lengths
            or not all(isinstance(x, int) and x > 0 for x in lengths)
        ):
            raise WorkloadError(f"{where}: 'lengths' must be a non-empty list of positive integers")
        if not isinstance(rewards, list) or len(rewards) != len(lengths):
            raise WorkloadError(f"{where}: 'rewards' must be a list as long as 'lengths'")
        if not all(
            isinstance(r, int | float) and not isinstance(r, bool) and np.isfinite(r)
            for r in rewards
        ):
            raise WorkloadError(f"{where}: 'rewards' must be finite numbers")
        ids = rec.get("prompt_ids")
        if ids is not None and (
            not isinstance(ids, list)
            or not all(isinstance(t, int) and 0 <= t < vocab_size for t in ids)
        ):
            raise WorkloadError(f"{where}: 'prompt_ids' must be token ids in [0, {vocab_size})")

    def items(self) -> list[PromptItem]:
        return [PromptItem(key, ids) for key, ids in self.prompt_ids.items()]

    def draw_group(self, key: str, step: int, n: int) -> list[Draw]:
        steps = self.records[key]
        nearest = min(steps, key=lambda s: (abs(s - step), s))
        rec = steps[nearest]
        trunc = rec.get("truncated") or [False] * len(rec["lengths"])
        m = len(rec["lengths"])
        return [
            Draw(int(rec["lengths"][i % m]), float(rec["rewards"][i % m]), bool(trunc[i % m]))
            for i in range(n)
        ]

    def describe(self) -> dict[str, Any]:
        return {"name": f"trace:{self.path}", "prompts": len(self.records)}


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


def make_workload(
    spec: str, *, num_prompts: int, n: int, max_len: int, seed: int, vocab_size: int
) -> Workload:
    if spec == "synthetic-longtail":
        return SyntheticLongtail(num_prompts, n, max_len, seed, vocab_size)
    if spec.startswith("trace:"):
        return TraceReplay(spec[len("trace:") :], vocab_size)
    if spec.startswith("task:"):
        raise WorkloadError(
            f"workload {spec!r}: real-task workloads run through `rollout bench --scenario frontier` "
            "(training + rollouts on a real toy task); use synthetic-longtail or trace:FILE here"
        )
    raise WorkloadError(f"workload: {spec!r} is not synthetic-longtail, trace:FILE or task:NAME")
