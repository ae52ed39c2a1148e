"""The rollout controller: one call runs one RL rollout step to a target of accepted groups.

Walk of a step (details per policy in ControllerConfig):
  1. resume: groups carried in the partial buffer are dispatched first (history: oldest first,
     so no sample outlives the staleness bound);
  2. fill: new prompts until `provision` groups are accepted or in flight (history: the planner
     skips likely zero-variance prompts, prices the rest by value per predicted token with an
     exploration floor, pools the predicted-longest for a long round (controller_tail) and
     orders the rest longest-first; in a long round the pool goes first);
  3. as a group finishes: rewards -> dynamic filter -> accepted (or dropped, and refilled);
  4. at the target: abort what is still running; partial policies keep the aborted samples (tokens,
     logprobs, segment weight versions) and surplus finished groups in the buffer, the others
     discard them;
  5. record every finished group in the history store; return exactly `rollout_batch_size`
     whole groups of n samples, with metrics.
With `tail_budget` set, a group's last samples get a length budget from their finished siblings
(controller_tail.sibling_budget); a sample in flight is aborted and resumed under it.
If anything fails mid-step (a reward raises, every engine dies), in-flight work is aborted and
every group of the step — accepted ones included — goes into the buffer before the error is
raised, so nothing already generated is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from rollout_accel.rollout.controller_config import ControllerConfig
from rollout_accel.rollout.controller_tail import TailPool, sibling_budget, sibling_estimate
from rollout_accel.rollout.partial_buffer import BufferedGroup, PartialBuffer
from rollout_accel.rollout.pool.base import EnginePool, RequestSpan
from rollout_accel.rollout.prompts import PromptItem, PromptSource
from rollout_accel.rollout.rewards import RewardFn, reward_value
from rollout_accel.rollout.sample_append import append_output
from rollout_accel.rollout.sample_types import Sample, Status
from rollout_accel.rollout.step_metrics import sample_metrics, spearman, tail_metrics
from rollout_accel.serving.spec.proposer import CORPUS_FIELD

PayloadHook = Callable[[Sample, dict[str, Any]], dict[str, Any]]
GroupFilter = Callable[[list[Sample]], bool]


class GroupSizeError(ValueError):
    """A group does not have n_samples_per_prompt samples."""


class FilterStarvedError(RuntimeError):
    """The dynamic filter rejected so many groups that the step's bound on new groups ran out."""


def nonzero_std(rewards: list[float]) -> bool:
    """DAPO's filter: keep a group only if its rewards are not all equal."""
    return len(rewards) > 1 and max(rewards) - min(rewards) > 1e-12


@dataclass
class GroupWork:
    """A group on its way through the step."""

    key: str
    item: PromptItem
    samples: list[Sample]
    resumed_tokens: int = 0
    planned_length: float | None = None
    new_tokens: int = 0
    cached_tokens: int = 0
    prompt_tokens: int = 0
    budget: int | None = None  # the max-of-n tail budget, once set
    done_lengths: list[int] = field(default_factory=list)
    in_flight: dict[str, Sample] = field(default_factory=dict)  # rid -> sample
    budget_aborted: set[str] = field(default_factory=set)

    @property
    def aborted(self) -> bool:
        return any(s.status in (Status.ABORTED, Status.PENDING) for s in self.samples)


@dataclass
class StepOutput:
    groups: list[list[Sample]]
    metrics: dict[str, float]
    spans: list[RequestSpan] = field(default_factory=list)
    start_time: float = 0.0


class RolloutController:
    """Runs rollout steps over an EnginePool; see the module docstring."""

    def __init__(
        self,
        pool: EnginePool,
        source: PromptSource,
        reward: RewardFn,
        config: ControllerConfig,
        planner: Any | None = None,
        buffer: PartialBuffer | None = None,
        payload_hook: PayloadHook | None = None,
        group_filter: GroupFilter | None = None,
    ) -> None:
        if config.policy == "history" and planner is None:
            raise ValueError(
                "policy history: needs a planner (rollout_accel.sampling.RolloutPlanner)"
            )
        if planner is None and (config.length_pricing or config.tail_batching):
            raise ValueError(
                "length_pricing / tail_batching: need length predictions, i.e. a planner "
                "(policy history)"
            )
        self.pool = pool
        self.source = source
        self.reward = reward
        self.config = config
        self.planner = planner
        self.buffer = (
            buffer
            if buffer is not None
            else PartialBuffer(config.max_staleness, config.stale_action)
        )
        self.payload_hook = payload_hook
        self.group_filter = group_filter
        self._group_ids = itertools.count()
        self._rng = np.random.default_rng(config.seed)
        self.tail: TailPool[GroupWork] | None = (
            TailPool(config.tail_share, config.tail_round_every, _planned)
            if config.batches_tail
            else None
        )
        self._deferred: set[str] = set()  # deferred by the planner and not yet run
        self._stopping = False  # the step's own abort at the target is under way
        self._counters: dict[str, float] = {}
        # slime's args when running inside slime (passed on to Sample.append_response_tokens).
        self.slime_args: Any = SimpleNamespace(
            sglang_speculative_algorithm="NGRAM" if config.drafts else None
        )

    # -- building work ----------------------------------------------------------------------
    def _new_work(self, item: PromptItem, planned_length: float | None = None) -> GroupWork:
        n = self.config.n_samples_per_prompt
        premade = item.metadata.get("samples")
        if premade is not None:
            samples = list(premade)
            if len(samples) != n:
                raise GroupSizeError(
                    f"group {item.key!r}: {len(samples)} samples, expected n_samples_per_prompt={n}"
                )
        else:
            group_index = next(self._group_ids)
            samples = [
                Sample(
                    group_index=group_index,
                    index=group_index * n + i,
                    prompt=item.prompt_text or "",
                    tokens=list(item.prompt_ids),
                    label=item.label,
                    metadata={k: v for k, v in item.metadata.items() if k != "samples"},
                )
                for i in range(n)
            ]
        for index, sample in enumerate(samples):
            sample.metadata.setdefault("prompt_key", item.key)
            sample.metadata.setdefault("prompt_length", len(item.prompt_ids))
            sample.metadata.setdefault("index_in_group", index)
            sample.metadata.setdefault("group_size", len(samples))
        return GroupWork(item.key, item, samples, planned_length=planned_length)

    def _resumed_work(self, group: BufferedGroup) -> GroupWork:
        item = PromptItem(
            group.key, group.prompt_ids, group.samples[0].label, None, group.prompt_meta
        )
        done = [
            s.response_length
            for s in group.samples
            if s.status in (Status.COMPLETED, Status.TRUNCATED)
        ]
        written = max((s.response_length for s in group.samples), default=0)
        work = GroupWork(
            group.key,
            item,
            group.samples,
            resumed_tokens=group.partial_tokens(),
            # Siblings in the step predict a straggler's length before any history does.
            planned_length=sibling_estimate(done, written),
            done_lengths=done,
        )
        cfg = self.config
        if cfg.tail_budget is not None:  # the budget its siblings set holds across steps
            budget = sibling_budget(
                done, len(group.samples), cfg.tail_budget, cfg.tail_budget_done, cfg.tail_budget_min
            )
            if budget is not None and budget < int(cfg.sampling_params["max_new_tokens"]):
                work.budget = budget
        return work

    def _fresh(
        self, count: int, step: int, counters: dict[str, float], long_round: bool = False
    ) -> list[GroupWork]:
        """Up to `count` new groups; the history policy asks the planner which candidates."""
        if count <= 0:
            return []
        if self.planner is None:
            return [self._new_work(item) for item in self.source.take(count)]
        from rollout_accel.sampling import Budget

        cfg = self.config
        out: list[GroupWork] = []
        looked = 0
        limit = math.ceil(cfg.max_candidates_factor * count)
        while len(out) < count and looked < limit:
            want = count - len(out)
            # Length pricing chooses among twice the candidates; without it every candidate the
            # selector keeps runs.
            candidates = self.source.take(max(want * 2, 8) if cfg.prices_length else want)
            if not candidates:
                break
            looked += len(candidates)
            by_key: dict[str, PromptItem] = {}
            repeats: list[PromptItem] = []
            for c in candidates:  # an epoch boundary can repeat a prompt within one take
                if c.key in by_key:
                    repeats.append(c)
                else:
                    by_key[c.key] = c
            candidates = list(by_key.values())
            keys = [c.key for c in candidates]
            # Exploration floor: the first candidates in data order run whatever their price.
            # Prompts without history are not priced either: their value is unknown, and
            # ranking them by predicted length alone would favour short, i.e. easy, prompts.
            floor = math.ceil(cfg.explore_floor * want) if cfg.prices_length else len(candidates)
            known = self.planner.store.prompt_stats(keys) if cfg.prices_length else {}
            required = keys[:floor] + [k for k in keys[floor:] if k not in known]
            plan = self.planner.plan(
                keys,
                [len(c.prompt_ids) for c in candidates],
                step,
                Budget(groups=want),
                self._rng,
                required=required,
            )
            counters["considered"] += len(candidates)
            counters["skipped"] += len(plan.skipped)
            self._deferred.difference_update([*(p.key for p in plan.items), *plan.skipped])
            self._deferred.update(plan.deferred)
            self.source.give_back([by_key[k] for k in plan.deferred] + repeats)
            cap = float(cfg.sampling_params["max_new_tokens"])
            planned = [
                self._new_work(by_key[p.key], min(p.expected_length, cap)) for p in plan.items
            ]
            if self.tail is not None:
                planned = self.tail.admit(planned, step, long_round)
            out.extend(planned)
        # longest-first across planning rounds too
        out.sort(key=lambda w: -(w.planned_length or 0.0))
        return out

    # -- one sample -------------------------------------------------------------------------
    def _payload(
        self, sample: Sample, remaining: int, rollout_id: int, segment: int
    ) -> dict[str, Any]:
        params = dict(self.config.sampling_params)
        params["max_new_tokens"] = remaining
        if self.config.drafts:
            # The hook for speculative decoding from history: the engine drafts from the corpus
            # of this prompt's earlier (and sibling) responses.
            key = sample.metadata.get("prompt_key", "")
            custom = dict(params.get("custom_params") or {})
            custom[CORPUS_FIELD] = f"{self.config.draft_corpus_prefix}{key}"
            params["custom_params"] = custom
        payload = {
            "input_ids": list(sample.tokens),
            "sampling_params": params,
            "return_logprob": True,
            "rid": f"r{rollout_id}-g{sample.group_index}-s{sample.index}-{segment}",
        }
        return self.payload_hook(sample, payload) if self.payload_hook else payload

    async def _run_sample(self, work: GroupWork, sample: Sample, rollout_id: int) -> None:
        cap = int(self.config.sampling_params["max_new_tokens"])
        while True:
            limit = cap if work.budget is None else min(cap, work.budget)
            remaining = limit - sample.response_length
            if remaining <= 0:
                sample.status = Status.TRUNCATED
                if limit < cap:
                    self._cut(sample)
                break
            segments = sample.metadata.setdefault("segments", [])
            if (
                sample.response_length > 0
                and self.config.mask_offpolicy
                and segments
                and segments[-1].get("rollout_id") != rollout_id
            ):
                # Tokens from an earlier policy are off-policy now: keep them as context only.
                sample.loss_mask = [0] * sample.response_length
            payload = self._payload(sample, remaining, rollout_id, len(segments))
            rid = str(payload.get("rid"))
            out = await self._generate(work, sample, payload, remaining, rollout_id)
            self._apply(sample, out, rollout_id)
            work.new_tokens += out["meta_info"].get("completion_tokens", 0)
            work.cached_tokens += out["meta_info"].get("cached_tokens", 0)
            work.prompt_tokens += out["meta_info"].get("prompt_tokens", 0)
            if (
                sample.status == Status.ABORTED
                and rid in work.budget_aborted
                and not self._stopping
            ):
                continue  # aborted by us to apply the tail budget: go on under it
            if (
                sample.status == Status.TRUNCATED
                and work.budget is not None
                and work.budget <= sample.response_length < cap
            ):
                self._cut(sample)  # stopped at the tail budget
            break
        if sample.status in (Status.COMPLETED, Status.TRUNCATED):
            work.done_lengths.append(sample.response_length)
            await self._apply_budget(work)
        if sample.status in (Status.COMPLETED, Status.TRUNCATED) and sample.reward is None:
            sample.reward = await self.reward(sample)
            reward_value(
                sample.reward, self.config.reward_key, f"sample {sample.index} of {work.key!r}"
            )

    async def _generate(
        self,
        work: GroupWork,
        sample: Sample,
        payload: dict[str, Any],
        remaining: int,
        rollout_id: int,
    ) -> dict[str, Any]:
        cost = len(sample.tokens) + remaining
        if self.config.places_by_length and work.planned_length is not None:
            # Place and balance by predicted tokens, not the cap: a group predicted long goes
            # to the engine with the least predicted work outstanding.
            expected = max(1.0, work.planned_length - sample.response_length)
            cost = len(sample.tokens) + int(min(remaining, expected))
        rid = str(payload.get("rid"))
        work.in_flight[rid] = sample
        try:
            return await self.pool.generate(
                payload, group_key=f"{work.key}@{rollout_id}", cost=cost
            )
        finally:
            work.in_flight.pop(rid, None)

    async def _apply_budget(self, work: GroupWork) -> None:
        """Sets the max-of-n tail budget once enough siblings are done, and aborts the samples
        in flight so that they resume under it (engines without abort-by-rid: at resume)."""
        cfg = self.config
        if cfg.tail_budget is None or work.budget is not None:
            return
        budget = sibling_budget(
            work.done_lengths,
            len(work.samples),
            cfg.tail_budget,
            cfg.tail_budget_done,
            cfg.tail_budget_min,
        )
        if budget is None or budget >= int(cfg.sampling_params["max_new_tokens"]):
            return
        work.budget = budget
        for rid in list(work.in_flight):
            work.budget_aborted.add(rid)
            await self.pool.abort_request(rid)

    def _cut(self, sample: Sample) -> None:
        """A sample stopped by the tail budget: slime's truncation (and DAPO's overlong mask)."""
        sample.status = Status.TRUNCATED
        sample.metadata["tail_cut"] = True
        if self.config.tail_cut == "mask":
            sample.loss_mask = [0] * sample.response_length
        self._counters["tail_cut_samples"] = self._counters.get("tail_cut_samples", 0.0) + 1

    def _apply(self, sample: Sample, out: dict[str, Any], rollout_id: int) -> None:
        """Appends one engine answer to the sample through `Sample.append_response_tokens`
        (slime's own when slime is importable), then records the segment."""
        meta = out["meta_info"]
        if sample.response_length == 0 and (
            out.get("output_ids") or meta.get("output_token_logprobs")
        ):
            sample.metadata.setdefault("start_rollout_id", rollout_id)
        added = append_output(sample, out, self.slime_args)
        version = str(meta.get("weight_version", "default"))
        sample.metadata.setdefault("segments", []).append(
            {"rollout_id": rollout_id, "tokens": added, "weight_version": version}
        )
        kind = (meta.get("finish_reason") or {}).get("type")
        if kind not in ("stop", "length", "abort"):
            sample.status = Status.FAILED
        # Trace-shaped simulation (rollout bench): the workload told the engine this response's
        # length via max_new_tokens; reaching it is the response's natural end, not truncation.
        simulated_end = sample.metadata.get("simulated_length")
        if (
            kind == "length"
            and simulated_end is not None
            and sample.response_length >= simulated_end
        ):
            truncated = bool(sample.metadata.get("simulated_truncated", False))
            sample.status = Status.TRUNCATED if truncated else Status.COMPLETED
        if sample.status == Status.COMPLETED and sample.response_length >= int(
            self.config.sampling_params["max_new_tokens"]
        ):
            sample.status = Status.TRUNCATED

    async def _run_group(self, work: GroupWork, rollout_id: int) -> GroupWork:
        todo = [
            s
            for s in work.samples
            if s.status not in (Status.COMPLETED, Status.TRUNCATED) or s.reward is None
        ]
        try:
            await asyncio.gather(*(self._run_sample(work, s, rollout_id) for s in todo))
        finally:
            self.pool.forget_group(f"{work.key}@{rollout_id}")
        return work

    # -- the step ---------------------------------------------------------------------------
    def _keep(self, work: GroupWork) -> bool:
        if self.group_filter is not None:
            return bool(self.group_filter(work.samples))
        if not self.config.filter_enabled:
            return True
        rewards = [reward_value(s.reward, self.config.reward_key, work.key) for s in work.samples]
        return nonzero_std(rewards)

    async def step(self, rollout_id: int) -> StepOutput:
        cfg = self.config
        target, provision = cfg.rollout_batch_size, cfg.provision
        start = time.perf_counter()
        cpu_start = time.process_time()
        span_mark = len(self.pool.timeline)
        counters: dict[str, float] = dict.fromkeys(
            (
                "considered",
                "skipped",
                "filtered",
                "aborted_tokens",
                "discarded_tokens",
                "resumed_tokens",
                "tail_cut_samples",
                "stale_finished",
            ),
            0.0,
        )
        self._counters = counters
        self._stopping = False
        accepted: list[GroupWork] = []
        finished: list[GroupWork] = []  # every group whose generation completed this step
        carried: list[GroupWork] = []  # back to the buffer at the end
        stale_before = self.buffer.stats.dropped_tokens
        queue: deque[GroupWork] = deque(
            self._resumed_work(g)
            for g in self.buffer.take(rollout_id, oldest_first=cfg.policy == "history")
        )
        # Partial tokens dropped for staleness were generated and are now thrown away.
        counters["discarded_tokens"] += self.buffer.stats.dropped_tokens - stale_before
        counters["resumed_tokens"] = float(sum(w.resumed_tokens for w in queue if w.aborted))
        long_round = self.tail is not None and self.tail.is_long_round(rollout_id, provision)
        if long_round:
            assert self.tail is not None
            queue.extend(self.tail.drain(rollout_id, max(provision - len(queue), 0)))
        counters["long_round"] = float(long_round)
        if self.config.places_by_length:
            await self._fit_concurrency(queue)
        running: dict[asyncio.Task, GroupWork] = {}
        exhausted = False
        # A filter that rejects (almost) everything would refill forever: bound the new groups one
        # step may start, and fail clearly instead of hanging.
        max_new = math.ceil(cfg.max_candidates_factor * provision)
        started_new = 0
        try:
            while len(accepted) < target or self._stale_running(running.values(), rollout_id):
                # Past the target (waiting for groups that cannot be carried) nothing new
                # starts: more in flight would only fill the buffer beyond the next step's use.
                need = provision - len(accepted) - len(running) if len(accepted) < target else 0
                if need > 0 and len(queue) < need and not exhausted:
                    want = min(need - len(queue), max_new - started_new)
                    fresh = self._fresh(want, rollout_id, counters, long_round) if want > 0 else []
                    started_new += len(fresh)
                    exhausted = not fresh
                    queue.extend(fresh)
                while need > 0 and queue:
                    work = queue.popleft()
                    running[asyncio.create_task(self._run_group(work, rollout_id))] = work
                    need -= 1
                if not running:
                    if len(accepted) < target and started_new >= max_new:
                        raise FilterStarvedError(
                            f"rollout step {rollout_id}: the group filter kept {len(accepted)} of "
                            f"{target} groups after {started_new} new groups (max_candidates_factor="
                            f"{cfg.max_candidates_factor}); too few prompts give mixed rewards"
                        )
                    break
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    work = running.pop(task)
                    task.result()  # re-raises reward and engine errors
                    if work.aborted:  # aborted from outside (e.g. pause_generation abort)
                        carried.append(work)
                        continue
                    finished.append(work)
                    if len(accepted) < target and self._keep(work):
                        accepted.append(work)
                    elif len(accepted) >= target and self._swap_in_stale(
                        work, accepted, carried, rollout_id
                    ):
                        counters["stale_finished"] += 1
                    elif len(accepted) >= target:
                        carried.append(work)  # surplus
                    else:
                        counters["filtered"] += 1
                        counters["discarded_tokens"] += work.new_tokens
            if running:
                self._stopping = True
                await self.pool.abort_all()
                results = await asyncio.gather(*running, return_exceptions=True)
                for task, result in zip(list(running), results, strict=True):
                    work = running.pop(task)
                    if isinstance(result, BaseException):
                        raise result
                    if not work.aborted:
                        finished.append(work)
                    carried.append(work)
        except BaseException:
            await self._recover(running, accepted, carried, queue)
            raise
        carried.extend(queue)  # resumed groups never dispatched stay buffered
        self._carry(carried, counters)
        groups = [w.samples for w in accepted]
        end = time.perf_counter()
        spans = self.pool.timeline[span_mark:]
        self._record_history(rollout_id, finished)
        metrics = self._metrics(rollout_id, accepted, finished, counters, spans, start, end)
        # CPU seconds of this process (engine threads included) over the step: on a shared
        # machine, a steadier measure of the work than wall time.
        metrics["perf/rollout_cpu_time"] = time.process_time() - cpu_start
        return StepOutput(groups, metrics, spans, start)

    def _stale(self, work: GroupWork, rollout_id: int) -> bool:
        """Carried to the next step, this group would break the staleness bound."""
        starts = [
            s.metadata["start_rollout_id"]
            for s in work.samples
            if s.metadata.get("start_rollout_id") is not None
        ]
        return bool(starts) and min(starts) <= rollout_id - self.config.max_staleness

    def _stale_running(self, running: Any, rollout_id: int) -> bool:
        """finish_stale: a running group that could not be carried keeps the step open (the
        engine keeps generating the rest meanwhile), instead of being dropped with its tokens."""
        return self.config.finishes_stale and any(self._stale(w, rollout_id) for w in running)

    def _swap_in_stale(
        self,
        work: GroupWork,
        accepted: list[GroupWork],
        carried: list[GroupWork],
        rollout_id: int,
    ) -> bool:
        """After the target: a finished group that cannot be carried takes the place of the
        latest accepted group that can (which goes to the buffer, still within the bound)."""
        if not (self.config.finishes_stale and self._stale(work, rollout_id) and self._keep(work)):
            return False
        for index in range(len(accepted) - 1, -1, -1):
            if not self._stale(accepted[index], rollout_id):
                carried.append(accepted.pop(index))
                accepted.append(work)
                return True
        return False

    def _carry(self, carried: list[GroupWork], counters: dict[str, float]) -> None:
        keep: list[BufferedGroup] = []
        for work in carried:
            partial = sum(s.response_length for s in work.samples if s.status == Status.ABORTED)
            if work.aborted:
                counters["aborted_tokens"] += partial
            if self.config.keeps_partials and (work.aborted or self.config.keep_surplus):
                keep.append(
                    BufferedGroup(
                        work.key, work.samples, list(work.item.prompt_ids), _meta(work.item)
                    )
                )
            else:
                counters["discarded_tokens"] += sum(s.response_length for s in work.samples)
        self.buffer.add(keep)

    async def _recover(
        self,
        running: dict[asyncio.Task, GroupWork],
        accepted: list[GroupWork],
        carried: list[GroupWork],
        queue: deque[GroupWork],
    ) -> None:
        """On failure: stop generation and keep every group of the step in the buffer."""
        if running:
            with contextlib.suppress(Exception):  # every engine may be gone; keep what we have
                await self.pool.abort_all()
            await asyncio.gather(*running, return_exceptions=True)
        everything = [*accepted, *carried, *running.values(), *queue]
        if self.tail is not None:  # unstarted pooled prompts go back to the data source
            self.source.give_back([w.item for w in self.tail.pool])
            self.tail.pool.clear()
        self.buffer.add(
            BufferedGroup(w.key, w.samples, list(w.item.prompt_ids), _meta(w.item))
            for w in everything
        )

    async def _fit_concurrency(self, queue: deque[GroupWork]) -> None:
        """Per-engine concurrency from the KV budget, at the predicted request size."""
        fit = getattr(self.pool, "fit_concurrency_to_kv", None)
        if fit is None:
            return
        cap = float(self.config.sampling_params["max_new_tokens"])
        lengths = [w.planned_length for w in queue if w.planned_length is not None]
        if self.tail is not None and self.tail.recent:
            lengths.extend(self.tail.recent)
        prompts = [len(w.item.prompt_ids) for w in queue] or [0]
        expected = statistics.fmean(lengths) if lengths else cap
        await fit(statistics.fmean(prompts) + min(expected, cap))

    def _record_history(self, rollout_id: int, finished: list[GroupWork]) -> None:
        if self.planner is None or not finished:
            return
        from rollout_accel.sampling import GroupRecord

        records = [
            GroupRecord(
                key=w.key,
                rewards=[reward_value(s.reward, self.config.reward_key, w.key) for s in w.samples],
                lengths=[s.response_length for s in w.samples],
                finish_reasons=[
                    "length" if s.status == Status.TRUNCATED else "stop" for s in w.samples
                ],
                weight_version=(w.samples[0].weight_versions or ["default"])[-1],
                prompt_length=len(w.item.prompt_ids),
                responses=[s.tokens[len(w.item.prompt_ids) :] for s in w.samples]
                if self.config.record_responses
                else None,
            )
            for w in finished
        ]
        self.planner.record(rollout_id, records)

    def _metrics(
        self,
        rollout_id: int,
        accepted: list[GroupWork],
        finished: list[GroupWork],
        counters: dict[str, float],
        spans: list[RequestSpan],
        start: float,
        end: float,
    ) -> dict[str, float]:
        elapsed = end - start
        groups = [w.samples for w in accepted]
        generated = float(sum(s.tokens for s in spans))
        effective = sum(
            1
            for w in accepted
            if nonzero_std(
                [reward_value(s.reward, self.config.reward_key, w.key) for s in w.samples]
            )
        )
        prompt_tokens = sum(w.prompt_tokens for w in finished)
        cached = sum(w.cached_tokens for w in finished)
        metrics: dict[str, float] = {
            "rollout/step": float(rollout_id),
            "perf/rollout_time": elapsed,
            "perf/tokens_per_gpu_per_sec": generated / elapsed / max(1, len(self.pool.engines)),
            "rollout/prefix_cache_hit_rate": cached / prompt_tokens if prompt_tokens else 0.0,
            "accel/accepted_groups": float(len(accepted)),
            "accel/effective_groups": float(effective),
            "accel/effective_groups_per_s": effective / elapsed if elapsed > 0 else 0.0,
            "accel/generated_tokens": generated,
            "accel/generated_tokens_per_s": generated / elapsed if elapsed > 0 else 0.0,
            "accel/filtered_groups": counters["filtered"],
            "accel/aborted_tokens": counters["aborted_tokens"],
            "accel/resumed_tokens": counters["resumed_tokens"],
            "accel/discarded_tokens": counters["discarded_tokens"],
            "accel/skip_rate": counters["skipped"] / counters["considered"]
            if counters["considered"]
            else 0.0,
            "accel/buffered_groups": float(len(self.buffer)),
            "accel/stale_dropped_groups": float(self.buffer.stats.dropped_groups),
            "accel/stale_restarted_groups": float(self.buffer.stats.restarted_groups),
            "accel/redispatched_requests": float(self.pool.stats.redispatched),
            "accel/tail_cut_samples": counters["tail_cut_samples"],
            "accel/stale_finished_groups": counters["stale_finished"],
            "accel/long_round": counters.get("long_round", 0.0),
            "accel/tail_pool": float(len(self.tail) if self.tail is not None else 0),
            # Work put off, not saved: prompts the planner deferred or pooled, not yet run.
            "accel/deferred_prompts": float(
                len(self._deferred) + (len(self.tail) if self.tail is not None else 0)
            ),
        }
        zero_std: dict[str, int] = {}
        for w in finished:
            rewards = [reward_value(s.reward, self.config.reward_key, w.key) for s in w.samples]
            if not nonzero_std(rewards):
                key = f"rollout/zero_std/count_{rewards[0]:g}"
                zero_std[key] = zero_std.get(key, 0) + 1
        metrics.update({k: float(v) for k, v in zero_std.items()})
        metrics.update(sample_metrics(groups))
        # Speculative decoding (drafts on): accepted tokens per verify forward, as slime logs it.
        verify = completed = 0
        for sample in (s for g in groups for s in g):
            info = getattr(sample, "spec_info", None)
            verify += getattr(info, "spec_verify_ct", 0) or 0
            completed += getattr(info, "completion_token_num", 0) or 0
        if verify:
            metrics["accel/spec_accept_length"] = completed / verify
        metrics.update(tail_metrics(spans, start, end))
        longest = max(
            (s for s in spans if s.finish != "failed"), key=lambda s: s.tokens, default=None
        )
        if longest is not None and longest.end > longest.start:
            metrics["perf/longest_sample_tokens_per_sec"] = longest.tokens / (
                longest.end - longest.start
            )
        planned = [
            (w.planned_length, statistics.fmean(s.response_length for s in w.samples))
            for w in finished
            if w.planned_length is not None
        ]
        if planned:
            metrics["accel/length_pred_spearman"] = spearman(
                [p for p, _ in planned], [a for _, a in planned]
            )
            metrics["accel/length_pred_mae"] = statistics.fmean(abs(p - a) for p, a in planned)
        for age, count in self.buffer.staleness_histogram(rollout_id + 1).items():
            metrics[f"accel/staleness/{age}"] = float(count)
        return metrics


def _planned(work: GroupWork) -> float:
    return work.planned_length or 0.0


def _meta(item: PromptItem) -> dict[str, Any]:
    return {k: v for k, v in item.metadata.items() if k != "samples"}
