"""Benchmark of the history-informed sampler on the synthetic long-tail trace (not a test).

    python -m rollout_accel.sampling.evaluation [--out FILE] [--timing-prompts 1000000]

Replays `SyntheticLongtailTrace` (parameters fixed in that module, printed here) for the same
number of training steps under several policies, each a fresh SQLite history:

- uniform: slime's default, the next `batch` prompts of the shuffled epoch, n = 16 each;
- selector: candidates in the same order; the selector skips predicted zero-variance prompts
  and the batch is filled with the next kept ones (GRESO-style), n = 16;
- selector+alloc fixed-n: as above, over a pool of 2 x batch kept candidates, the allocator
  picks the `batch` prompts with the best value per expected token (n = 16); the rest are
  deferred to the next step;
- selector+alloc var-n: the allocator spreads the same samples per step (batch x 16) over the
  pool with 4 <= n <= 32;
- selector no guard (ablation): the selector without its starvation guard (no forced retries),
  to show what the guarantee costs;
- oracle (ceiling): skips exactly the groups that would be zero-variance, except a prompt's
  first (it has no history yet): the best any history-based skip policy can do here.

Reported against uniform: the share of generated tokens spent on zero-variance groups,
effective (mixed-reward) groups per 1k generated tokens, skip precision and recall (against
the group the trace would have produced at n = 16), length-prediction Spearman on held-out steps
(predictions use only earlier steps), draft acceptance on epochs >= 2 (and sibling drafts in
epoch 1), and store timings. The latent pass rates drift with the step, not with what a policy
trained on: the benchmark measures rollout efficiency, not the accuracy a policy reaches.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .allocator import AllocatorConfig, Budget
from .drafts import DraftIndex
from .history import HistoryConfig, HistoryStore
from .length import LengthConfig, LengthPredictor
from .planner import PlannerConfig, RolloutPlanner
from .rank_correlation import spearman
from .records import GroupRecord
from .selector import PromptSelector, SelectorConfig
from .synthetic_trace import SyntheticLongtailTrace, trace_statistics

TARGET_GAIN = 2.0
TARGET_SPEARMAN = 0.6
TARGET_MS = 200.0


@dataclass(frozen=True, slots=True)
class EvalConfig:
    num_prompts: int = 4096
    n: int = 16
    batch: int = 256  # prompts per step (HistoSpec: 256 x 16)
    steps: int = 96  # six uniform epochs
    seed: int = 0
    max_len: int = 16_384
    draft_prompts: int = 48
    draft_epochs: int = 4
    draft_k: int = 8
    draft_max_len: int = 2048
    timing_prompts: int = 100_000
    timing_steps: int = 100


@dataclass(slots=True)
class PolicyResult:
    name: str
    tokens: int = 0
    groups: int = 0
    effective: int = 0
    zero_var_tokens: int = 0
    samples: int = 0
    consumed: int = 0  # candidates taken from the data source (rolled or skipped)
    skipped: int = 0
    skipped_zero: int = 0
    decided_zero: int = 0
    decided: int = 0
    length_pairs: list[tuple[int, float, float, bool]] = field(default_factory=list)
    zero_tokens_by_reason: dict[str, int] = field(default_factory=dict)

    def row(self, uniform: PolicyResult | None, num_prompts: int) -> dict[str, float]:
        per_1k = 1000.0 * self.effective / max(self.tokens, 1)
        base = 1000.0 * uniform.effective / max(uniform.tokens, 1) if uniform else per_1k
        has_skips = self.name != "uniform"
        return {
            "tokens_M": self.tokens / 1e6,
            "groups": float(self.groups),
            "samples": float(self.samples),
            "effective_groups": float(self.effective),
            "zero_var_token_share": self.zero_var_tokens / max(self.tokens, 1),
            "effective_per_1k_tokens": per_1k,
            "gain_vs_uniform": per_1k / base if base > 0 else float("nan"),
            "skip_precision": (self.skipped_zero / self.skipped if self.skipped else float("nan"))
            if has_skips
            else float("nan"),
            "skip_recall": (
                self.skipped_zero / self.decided_zero if self.decided_zero else float("nan")
            )
            if has_skips
            else float("nan"),
            "epochs": self.consumed / num_prompts,
            **{
                f"zero_var_token_share_{reason}": tokens / max(self.tokens, 1)
                for reason, tokens in sorted(self.zero_tokens_by_reason.items())
            },
        }


class _Stream:
    """The data source: epoch after epoch of the trace's seeded shuffles, with hand-backs."""

    def __init__(self, trace: SyntheticLongtailTrace) -> None:
        self.trace = trace
        self.epoch = 0
        self.queue: deque[int] = deque(trace.epoch_order(0).tolist())
        self.front: deque[int] = deque()

    def take(self, m: int) -> list[int]:
        """The next m distinct prompts (a repeat across an epoch boundary waits for the next)."""
        out: list[int] = []
        seen: set[int] = set()
        later: list[int] = []
        while len(out) < m:
            if self.front:
                p = self.front.popleft()
            else:
                if not self.queue:
                    self.epoch += 1
                    self.queue.extend(self.trace.epoch_order(self.epoch).tolist())
                p = self.queue.popleft()
            if p in seen:
                later.append(p)
                continue
            seen.add(p)
            out.append(p)
        self.give_back(later)
        return out

    def give_back(self, keys: list[int]) -> None:
        self.front.extendleft(reversed(keys))


def _record(trace: SyntheticLongtailTrace, prompt: int, step: int, n: int) -> GroupRecord:
    g = trace.draw_group(prompt, step, n)
    return GroupRecord(
        key=prompt,
        rewards=g.rewards,
        lengths=g.lengths,
        finish_reasons=g.finish_reasons,
        prompt_length=int(trace.prompt_lengths[prompt]),
    )


def _account(res: PolicyResult, rec: GroupRecord, reason: str) -> None:
    tokens = int(np.sum(rec.lengths))
    zero = float(np.min(rec.rewards)) == float(np.max(rec.rewards))
    if zero:
        res.zero_tokens_by_reason[reason] = res.zero_tokens_by_reason.get(reason, 0) + tokens
    res.tokens += tokens
    res.groups += 1
    res.samples += len(rec.rewards)
    res.effective += int(not zero)
    res.zero_var_tokens += tokens * int(zero)


def _counterfactual_zero(trace: SyntheticLongtailTrace, prompt: int, step: int, n: int) -> bool:
    return trace.draw_group(prompt, step, n).zero_variance


def run_policy(
    name: str, trace: SyntheticLongtailTrace, cfg: EvalConfig, workdir: Path
) -> PolicyResult:
    """Replay `cfg.steps` steps of one policy; returns its accounting."""
    store = HistoryStore(workdir / f"{name.replace(' ', '_').replace('+', '_')}.db")
    res = PolicyResult(name)
    stream = _Stream(trace)
    rng = np.random.default_rng([cfg.seed, 0x5E1])
    predictor = LengthPredictor(store, LengthConfig(max_len=cfg.max_len))
    # The ablation turns the starvation guard off (forced retries), everything else default.
    unguarded = SelectorConfig(max_consecutive_skips=10**6, max_skips_bound=10**6)
    selector = PromptSelector(store, unguarded if name.endswith("(ablation)") else None)
    planner = None
    if name.startswith("selector+alloc"):
        alloc = (
            AllocatorConfig(fixed_n=cfg.n)
            if name.endswith("fixed-n")
            else AllocatorConfig(min_n=4, max_n=32)
        )
        planner = RolloutPlanner(
            store, PlannerConfig(allocator=alloc, length=LengthConfig(max_len=cfg.max_len))
        )
    plens = trace.prompt_lengths
    seen: set[int] = set()
    for step in range(cfg.steps):
        if name == "uniform":
            chosen = [(p, cfg.n, "uniform") for p in stream.take(cfg.batch)]
            res.consumed += len(chosen)
        elif name.startswith("oracle"):
            # Skips exactly the groups that would be zero-variance, except a prompt's first:
            # the ceiling of any policy that must see a prompt once before judging it.
            chosen = []
            while len(chosen) < cfg.batch:
                p = stream.take(1)[0]
                res.consumed += 1
                zero = _counterfactual_zero(trace, p, step, cfg.n)
                if zero and p in seen:
                    _score_skips(res, trace, step, cfg.n, [], [p])
                    continue
                _score_skips(res, trace, step, cfg.n, [p], [])
                chosen.append((p, cfg.n, "oracle"))
                seen.add(p)
        elif planner is None:
            chosen = []
            while len(chosen) < cfg.batch:
                cand = stream.take(cfg.batch - len(chosen))
                sel = selector.select(cand, step, rng)
                res.consumed += len(cand)
                if sel.skipped:
                    store.record_skips(step, sel.skipped)
                _score_skips(res, trace, step, cfg.n, sel.selected, sel.skipped)
                chosen += [(d.key, cfg.n, d.reason.value) for d in sel.decisions if d.keep]
        else:
            # Over-provision 2x, like slime's over-sampling; top up while skips leave room.
            fixed = name.endswith("fixed-n")
            left = cfg.batch if fixed else cfg.batch * cfg.n
            chosen = []
            for _ in range(8):
                pool = stream.take(2 * cfg.batch)
                budget = Budget(groups=left) if fixed else Budget(samples=left)
                plan = planner.plan(pool, [int(plens[p]) for p in pool], step, budget, rng)
                stream.give_back(list(plan.deferred))
                res.consumed += len(pool) - len(plan.deferred)
                _score_skips(res, trace, step, cfg.n, [i.key for i in plan.items], plan.skipped)
                chosen += [(i.key, i.n, i.reason.value) for i in plan.items]
                left -= len(plan.items) if fixed else sum(i.n for i in plan.items)
                if left < (1 if fixed else 4) or plan.deferred:
                    break
        keys = [p for p, _, _ in chosen]
        estimates = predictor.predict(keys, [int(plens[p]) for p in keys])
        records = [_record(trace, p, step, n) for p, n, _ in chosen]
        for rec, est, (_, _, reason) in zip(records, estimates, chosen, strict=True):
            _account(res, rec, reason)
            actual = float(np.mean(rec.lengths))
            res.length_pairs.append((step, est.mean, actual, est.from_history))
        if planner is not None:
            planner.record(step, records)
        else:
            outcomes = store.record_groups(step, records)
            if name.startswith("selector"):
                selector.observe(outcomes)
    store.close()
    return res


def _score_skips(
    res: PolicyResult,
    trace: SyntheticLongtailTrace,
    step: int,
    n: int,
    rolled: list[int],
    skipped: list[int],
) -> None:
    """Skip precision / recall against the group the trace would give at slime's fixed n."""
    zero_skipped = sum(_counterfactual_zero(trace, p, step, n) for p in skipped)
    zero_rolled = sum(_counterfactual_zero(trace, p, step, n) for p in rolled)
    res.skipped += len(skipped)
    res.skipped_zero += zero_skipped
    res.decided += len(skipped) + len(rolled)
    res.decided_zero += zero_skipped + zero_rolled


def length_metrics(res: PolicyResult, steps: int) -> dict[str, float]:
    """Spearman of predicted vs realised group mean length: held-out last third, cold start."""
    pairs = np.array([(s, p, a, h) for s, p, a, h in res.length_pairs], dtype=np.float64)
    held = (pairs[:, 0] >= 2 * steps // 3) & (pairs[:, 3] == 1)
    cold = pairs[:, 3] == 0
    return {
        "spearman_heldout": spearman(pairs[held, 1], pairs[held, 2]),
        "spearman_cold_start": spearman(pairs[cold, 1], pairs[cold, 2]),
        "heldout_groups": float(held.sum()),
        "cold_groups": float(cold.sum()),
    }


def draft_metrics(cfg: EvalConfig, workdir: Path) -> dict[str, float]:
    """Replay speculative decoding over responses: history drafts (epoch >= 2), siblings (1)."""
    trace = SyntheticLongtailTrace(
        cfg.draft_prompts, 8, cfg.draft_max_len, cfg.seed, horizon_steps=cfg.steps
    )
    store = HistoryStore(workdir / "drafts.db")
    steps_per_epoch = max(cfg.num_prompts // cfg.batch, 1)
    hist = _Acceptance()
    sib = _Acceptance()
    for epoch in range(cfg.draft_epochs):
        step = epoch * steps_per_epoch
        index = DraftIndex(store)
        records = []
        for p in range(cfg.draft_prompts):
            g = trace.draw_group(p, step)
            tokens = [trace.response_tokens(p, step, j, int(g.lengths[j])) for j in range(8)]
            siblings = DraftIndex()  # epoch-1 view: only this group's finished siblings
            for j, r in enumerate(tokens):
                if epoch >= 1:
                    hist.replay(lambda gen, p=p, ix=index: ix.propose(p, gen, cfg.draft_k), r)
                elif j > 0:
                    sib.replay(lambda gen, p=p, ix=siblings: ix.propose(p, gen, cfg.draft_k), r)
                siblings.add_response(p, r)
            records.append(
                GroupRecord(
                    key=p,
                    rewards=g.rewards,
                    lengths=g.lengths,
                    finish_reasons=g.finish_reasons,
                    responses=tokens,
                )
            )
        store.record_groups(step, records)
    store.close()
    return {
        "history_accepted_per_proposal": hist.per_proposal(),
        "history_tokens_per_step": hist.per_step(),
        "history_proposal_rate": hist.proposal_rate(),
        "sibling_accepted_per_proposal": sib.per_proposal(),
        "sibling_tokens_per_step": sib.per_step(),
        "draft_k": float(cfg.draft_k),
    }


@dataclass(slots=True)
class _Acceptance:
    steps: int = 0
    proposals: int = 0
    accepted: int = 0
    tokens: int = 0

    def replay(self, propose: Callable[[np.ndarray], list[int]], response: np.ndarray) -> None:
        """Verify drafts against the true response: accept the matching prefix, plus one token
        the target model produces itself (the usual speculative-decoding step)."""
        pos = 0
        while pos < response.size:
            draft = propose(response[:pos])
            acc = 0
            for t in draft:
                if pos + acc < response.size and response[pos + acc] == t:
                    acc += 1
                else:
                    break
            self.steps += 1
            self.proposals += int(bool(draft))
            self.accepted += acc
            step_tokens = min(acc + 1, response.size - pos)
            self.tokens += step_tokens
            pos += step_tokens

    def per_proposal(self) -> float:
        return self.accepted / self.proposals if self.proposals else float("nan")

    def per_step(self) -> float:
        return self.tokens / self.steps if self.steps else float("nan")

    def proposal_rate(self) -> float:
        return self.proposals / self.steps if self.steps else float("nan")


def timing_metrics(cfg: EvalConfig, workdir: Path) -> dict[str, float]:
    """Store timings on a history of `timing_prompts` prompts over `timing_steps` steps."""
    rng = np.random.default_rng(cfg.seed)
    store = HistoryStore(workdir / "timing.db", HistoryConfig())
    per_step = max(cfg.timing_prompts // cfg.timing_steps, 1)
    t0 = time.perf_counter()
    for step in range(cfg.timing_steps):
        keys = range(step * per_step, (step + 1) * per_step)
        store.record_groups(step, _random_groups(rng, keys, cfg.n))
    fill_s = time.perf_counter() - t0
    planner = RolloutPlanner(store, PlannerConfig(allocator=AllocatorConfig(fixed_n=cfg.n)))
    known = cfg.timing_prompts
    rec_ms, score_ms, rec_cpu, score_cpu = [], [], [], []
    for rep in range(7):
        step = cfg.timing_steps + rep
        # Half the step's groups are prompts seen before, half are new (fewer seen ones if the
        # history is smaller than that).
        old = min(512, known)
        keys = [*rng.choice(known, old, replace=False).tolist(), *range(known, known + 1024 - old)]
        known += 1024 - old
        groups = _random_groups(rng, keys, cfg.n)
        t, c = time.perf_counter(), time.process_time()
        store.record_groups(step, groups)
        rec_ms.append(1e3 * (time.perf_counter() - t))
        rec_cpu.append(1e3 * (time.process_time() - c))
        old = min(3584, known)
        cand = [*rng.choice(known, old, replace=False).tolist(), *range(known, known + 4096 - old)]
        plens = rng.integers(20, 400, len(cand)).tolist()
        t, c = time.perf_counter(), time.process_time()
        planner.plan(cand, plens, step + 1, Budget(groups=1024), rng)
        score_ms.append(1e3 * (time.perf_counter() - t))
        score_cpu.append(1e3 * (time.process_time() - c))
    size_mb = sum(f.stat().st_size for f in workdir.glob("timing.db*")) / 1e6
    prompts = store.num_prompts()
    store.close()
    return {
        "prompts": float(prompts),
        "fill_seconds": fill_s,
        "db_mb": size_mb,
        "record_1024x16_ms_median": float(np.median(rec_ms)),
        "record_1024x16_ms_max": float(np.max(rec_ms)),
        "score_4096_ms_median": float(np.median(score_ms)),
        "score_4096_ms_max": float(np.max(score_ms)),
        "record_1024x16_cpu_ms_median": float(np.median(rec_cpu)),
        "score_4096_cpu_ms_median": float(np.median(score_cpu)),
        # Other processes share this machine's cores; wall time includes waiting for them.
        "load_average_1min": os.getloadavg()[0],
        "cpu_count": float(os.cpu_count() or 0),
    }


def _random_groups(rng: np.random.Generator, keys: range | list[int], n: int) -> list[GroupRecord]:
    keys = list(keys)
    p = rng.random(len(keys))
    rewards = (rng.random((len(keys), n)) < p[:, None]).astype(np.float64)
    lengths = np.minimum(rng.lognormal(7.0, 1.0, (len(keys), n)), 16384).astype(np.int64) + 1
    return [
        GroupRecord(key=k, rewards=rewards[i], lengths=lengths[i], prompt_length=int(50 + k % 300))
        for i, k in enumerate(keys)
    ]


POLICIES = (
    "uniform",
    "selector",
    "selector+alloc fixed-n",
    "selector+alloc var-n",
    "selector no guard (ablation)",
    "oracle (ceiling)",
)


def evaluate(cfg: EvalConfig, workdir: Path, log: Callable[[str], None] = print) -> dict:
    """Run everything; returns the JSON-able report."""
    trace = SyntheticLongtailTrace(
        cfg.num_prompts, cfg.n, cfg.max_len, cfg.seed, horizon_steps=cfg.steps
    )
    epoch_steps = max(cfg.num_prompts // cfg.batch, 1)
    stat_steps = list(range(0, cfg.steps, epoch_steps))
    report: dict = {"config": _asdict(cfg), "trace": trace.describe()}
    report["trace_statistics"] = trace_statistics(trace, stat_steps, min(cfg.num_prompts, 2048))
    log("trace parameters: " + json.dumps(report["trace"]))
    log(
        "trace statistics: "
        + json.dumps({k: round(v, 3) for k, v in report["trace_statistics"].items()})
    )
    results = {}
    for name in POLICIES:
        t = time.perf_counter()
        results[name] = run_policy(name, trace, cfg, workdir)
        log(f"policy {name}: {time.perf_counter() - t:.1f}s")
    uniform = results["uniform"]
    report["policies"] = {n: r.row(uniform, cfg.num_prompts) for n, r in results.items()}
    report["length"] = {
        "uniform": length_metrics(uniform, cfg.steps),
        "selector": length_metrics(results["selector"], cfg.steps),
    }
    t = time.perf_counter()
    report["drafts"] = draft_metrics(cfg, workdir)
    log(f"drafts: {time.perf_counter() - t:.1f}s")
    t = time.perf_counter()
    report["timing"] = timing_metrics(cfg, workdir)
    log(f"timing: {time.perf_counter() - t:.1f}s")
    return report


def _asdict(cfg: EvalConfig) -> dict[str, object]:
    return {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}


def format_report(report: dict) -> str:
    """The policy table, then the headline figures against their targets."""
    cols = [
        ("tokens_M", "tokens (M)", "{:.1f}"),
        ("groups", "groups", "{:.0f}"),
        ("zero_var_token_share", "zero-var token share", "{:.3f}"),
        ("effective_per_1k_tokens", "eff. groups / 1k tok", "{:.4f}"),
        ("gain_vs_uniform", "vs uniform", "{:.2f}x"),
        ("skip_precision", "skip precision", "{:.3f}"),
        ("skip_recall", "skip recall", "{:.3f}"),
        ("epochs", "epochs", "{:.2f}"),
    ]
    width = max(len(n) for n in report["policies"]) + 2
    lines = ["policy".ljust(width) + "  ".join(h.rjust(max(len(h), 8)) for _, h, _ in cols)]
    for name, row in report["policies"].items():
        cells = []
        for key, head, fmt in cols:
            v = row[key]
            cells.append(("-" if v != v else fmt.format(v)).rjust(max(len(head), 8)))
        lines.append(name.ljust(width) + "  ".join(cells))
    pol = report["policies"]
    sel = pol["selector"]["gain_vs_uniform"]
    why = ", ".join(
        f"{k.removeprefix('zero_var_token_share_')} {v:.3f}"
        for k, v in pol["selector"].items()
        if k.startswith("zero_var_token_share_")
    )
    lu, ls = report["length"]["uniform"], report["length"]["selector"]
    d, t = report["drafts"], report["timing"]
    checks = [
        ("selector eff. groups / 1k tokens vs uniform", f"{sel:.2f}x", f">= {TARGET_GAIN}x",
         sel >= TARGET_GAIN),
        ("selector+alloc var-n eff. groups / 1k tokens vs uniform",
         f"{pol['selector+alloc var-n']['gain_vs_uniform']:.2f}x", "-", None),
        ("selector without starvation guard (ablation) vs uniform",
         f"{pol['selector no guard (ablation)']['gain_vs_uniform']:.2f}x", "-", None),
        ("oracle ceiling (skips every zero-var group but a prompt's first)",
         f"{pol['oracle (ceiling)']['gain_vs_uniform']:.2f}x", "-", None),
        (f"selector zero-var token share by reason: {why}", "", "-", None),
        ("length Spearman, held-out steps (uniform run)", f"{lu['spearman_heldout']:.3f}",
         f">= {TARGET_SPEARMAN}", lu["spearman_heldout"] >= TARGET_SPEARMAN),
        ("length Spearman, held-out steps (selector run)", f"{ls['spearman_heldout']:.3f}",
         f">= {TARGET_SPEARMAN}", ls["spearman_heldout"] >= TARGET_SPEARMAN),
        ("length Spearman, cold start (prior only)", f"{lu['spearman_cold_start']:.3f}", "-",
         None),
        (f"drafts epoch>=2: accepted / proposal (k={d['draft_k']:.0f})",
         f"{d['history_accepted_per_proposal']:.2f}", "-", None),
        ("drafts epoch>=2: tokens / verify step", f"{d['history_tokens_per_step']:.2f}", "-",
         None),
        ("drafts epoch 1 siblings: accepted / proposal",
         f"{d['sibling_accepted_per_proposal']:.2f}", "-", None),
        (f"record 1024x16 groups, wall ms median / max ({t['prompts']:.0f} prompts)",
         f"{t['record_1024x16_ms_median']:.0f} / {t['record_1024x16_ms_max']:.0f}",
         f"< {TARGET_MS:.0f}", t["record_1024x16_ms_max"] < TARGET_MS),
        ("score 4096 candidates, wall ms median / max",
         f"{t['score_4096_ms_median']:.0f} / {t['score_4096_ms_max']:.0f}",
         f"< {TARGET_MS:.0f}", t["score_4096_ms_max"] < TARGET_MS),
        (f"  (CPU ms median record / score; {t['cpu_count']:.0f} cores, "
         f"load average {t['load_average_1min']:.1f})",
         f"{t['record_1024x16_cpu_ms_median']:.0f} / {t['score_4096_cpu_ms_median']:.0f}",
         "-", None),
    ]  # fmt: skip
    w = max(len(c[0]) for c in checks) + 2
    lines += ["", "metric".ljust(w) + "value".rjust(14) + "target".rjust(10) + "  met"]
    for label, value, target, ok in checks:
        met = "-" if ok is None else ("yes" if ok else "NO")
        lines.append(label.ljust(w) + value.rjust(14) + target.rjust(10) + "  " + met)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rollout_accel.sampling.evaluation", description=__doc__.split("\n")[0]
    )
    d = EvalConfig()
    parser.add_argument("--out", type=Path, help="write the full report as JSON here")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--num-prompts", type=int, default=d.num_prompts)
    parser.add_argument("--batch", type=int, default=d.batch)
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--timing-prompts", type=int, default=d.timing_prompts)
    parser.add_argument("--timing-steps", type=int, default=d.timing_steps)
    parser.add_argument("--draft-prompts", type=int, default=d.draft_prompts)
    parser.add_argument("--workdir", type=Path, help="keep the databases here (default: temp)")
    args = parser.parse_args(argv)
    cfg = EvalConfig(
        num_prompts=args.num_prompts,
        batch=args.batch,
        steps=args.steps,
        seed=args.seed,
        timing_prompts=args.timing_prompts,
        timing_steps=args.timing_steps,
        draft_prompts=args.draft_prompts,
    )
    with tempfile.TemporaryDirectory(prefix="sampler-eval-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        report = evaluate(cfg, workdir)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=float))
    print(format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
