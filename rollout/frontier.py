"""Accuracy-speed frontier: the same local training under every rollout policy, over seeds.

    rollout bench --scenario frontier --out runs/frontier          # -> frontier.main(argv)
    python -m rollout_accel.rollout.frontier --out runs/frontier --quick

Every policy runs the same recipe (default recipes/local/arithmetic-sync.toml) with the same
seed, SFT warm start (one cached checkpoint per seed), RL steps and accepted groups per step;
only `rollout.policy` differs. Runs are interleaved (seed by seed, the policy order rotated per
seed) so drifting machine load hits every policy alike.

Reported per policy: final held-out accuracy (mean ± standard error over seeds), RL wall time,
and time-to-accuracy: the RL wall time of the first evaluation whose accuracy reaches the sync
run's final accuracy *of the same seed* (paired), also as a fraction of that sync run's total RL
wall time. Wall time excludes SFT and evaluation (see `local.loop`); CPU time is reported next
to it because this machine may be shared. A second, smoothed table takes "final accuracy" as the
mean of the last `SMOOTH_WINDOW` evaluations, since one evaluation of a still-moving policy is
noisy. Outputs in --out: results.json, table.md, frontier.png, and runs/ (each run's
metrics.jsonl and summary.json). `--reanalyse` rebuilds the tables and plot from results.json.

With power (`power_analysis`, the first table of table.md): per seed, the target is that seed's
sync final accuracy (mean of the last `SMOOTH_WINDOW` evaluations); each run's time to target is
paired with sync's own time to it on the same seed, and the table gives the geometric mean of
the ratio with its 95% confidence interval (t over the seeds' log ratios). A policy counts as
faster only if the whole interval is below 1. Final accuracy: mean with its 95% interval.
Besides the policies, variants run a policy with settings changed (`VARIANTS`, e.g.
`history-tail`: the max-of-n tail budget on, to measure what it costs in accuracy).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rollout_accel.rollout.controller_config import POLICIES
from rollout_accel.rollout.recipe import Recipe, RecipeError, load_recipe

DEFAULT_RECIPE = "recipes/local/arithmetic-sync.toml"
# The target the design asks of the history policy, checked and reported (not enforced).
TARGET_TIME_FRACTION = 0.5
QUICK = {"train.steps": 50, "eval.every": 10}
SMOOTH_WINDOW = 3
# Named policy variants: label -> recipe overrides.
VARIANTS: dict[str, dict[str, Any]] = {
    "history-tail": {"rollout.policy": "history", "rollout.tail_budget": 2.0},
    "partial-tail": {"rollout.policy": "partial", "rollout.tail_budget": 2.0},
}
# Two-sided 95% t quantiles by degrees of freedom (df > 30: 2.0).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip


def find_default_recipe() -> Path:
    """recipes/local/arithmetic-sync.toml under the working directory, else the source tree."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        path = base / DEFAULT_RECIPE
        if path.is_file():
            return path
    raise RecipeError(
        f"recipe: {DEFAULT_RECIPE} not found here or in the source tree; pass --recipe"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rollout bench --scenario frontier",
        description="Accuracy vs wall time of one local training recipe under each rollout "
        "policy, over several seeds (time-to-accuracy table + frontier plot).",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--recipe", help=f"base recipe (default {DEFAULT_RECIPE})")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated run seeds")
    parser.add_argument(
        "--policies", default=",".join(POLICIES), help="comma-separated; must include sync"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"one seed and {QUICK['train.steps']} RL steps: a smoke run, not a measurement",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key for every run (e.g. --set train.steps=100)",
    )
    parser.add_argument(
        "--wandb-mode",
        default="disabled",
        choices=("auto", "offline", "online", "disabled"),
        help="W&B for each run (default disabled: JSON logs only, no background uploader)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--reanalyse",
        action="store_true",
        help="no runs: rebuild table.md, frontier.png and the analysis from --out/results.json",
    )
    return parser


def _parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise RecipeError(f"{what}: empty list")
    if len(set(items)) != len(items):
        raise RecipeError(f"{what}: duplicates in {text!r}")
    return items


def plan_runs(
    base: Recipe, policies: Sequence[str], seeds: Sequence[int], out: Path, wandb_mode: str
) -> list[Recipe]:
    """One recipe per (seed, policy), seed-major, the policy order rotated by one per seed."""
    runs = []
    for i, seed in enumerate(seeds):
        order = [policies[(j + i) % len(policies)] for j in range(len(policies))]
        for policy in order:
            changes = VARIANTS.get(policy, {"rollout.policy": policy})
            runs.append(
                base.with_updates(
                    {
                        **changes,
                        "run.seed": seed,
                        "run.name": f"frontier-{policy}",
                        "run.out_dir": str(out / "runs"),
                        "run.wandb_mode": wandb_mode,
                    }
                )
            )
    return runs


def run_label(recipe: Recipe) -> str:
    """The policy or variant name a planned run stands for (from its run name)."""
    return recipe.run.name.removeprefix("frontier-")


def t975(df: int) -> float:
    """The two-sided 95% quantile of Student's t with `df` degrees of freedom."""
    if df < 1:
        raise ValueError("t975: df must be >= 1")
    at = max((k for k in _T975 if k <= df), default=1)
    return _T975[at] if df <= 30 else 2.0


def mean_ci(values: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, half-width of its 95% confidence interval); half-width None for < 2 values."""
    if not values:
        return None, None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def _runs_by_policy_and_seed(
    summaries: list[dict[str, Any]],
) -> tuple[dict[tuple[str, int], dict[str, Any]], list[int]]:
    """Run summaries by (policy, seed), and the seeds; every seed needs its sync run."""
    by = {(s["policy"], s["seed"]): s for s in summaries}
    seeds = sorted({s["seed"] for s in summaries})
    if any(("sync", seed) not in by for seed in seeds):
        raise ValueError("frontier: every seed needs a sync run (it sets the target)")
    return by, seeds


def power_analysis(
    summaries: Sequence[dict[str, Any]],
    policies: Sequence[str],
    window: int = SMOOTH_WINDOW,
    clock: str = "wall",
) -> dict[str, Any]:
    """Paired time-to-target with 95% intervals (module docstring). A run that never reaches
    the target counts with its whole RL time (then `faster` is never claimed for it).
    `clock`: "wall" (RL wall seconds) or "cpu" (the process's CPU seconds: steadier than wall
    time on a shared machine)."""
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock: {clock!r} is not wall or cpu")
    total = "rl_wall_seconds" if clock == "wall" else "rl_cpu_seconds"
    by, seeds = _runs_by_policy_and_seed(summaries)
    rows = []
    for policy in policies:
        log_ratios, times, fractions, finals, reached = [], [], [], [], 0
        for seed in seeds:
            run, sync = by.get((policy, seed)), by[("sync", seed)]
            if run is None:
                continue
            target = final_accuracy(sync, window)
            sync_hit = first_reach(sync["evals"], target)
            hit = first_reach(run["evals"], target)
            reached += hit is not None
            t = hit[clock] if hit is not None else run[total]
            finals.append(final_accuracy(run, window))
            times.append(t)
            fractions.append(t / sync[total])
            if sync_hit is not None and sync_hit[clock] > 0 and t > 0:
                log_ratios.append(math.log(t / sync_hit[clock]))
        lr_mean, lr_half = mean_ci(log_ratios)
        ratio = math.exp(lr_mean) if lr_mean is not None else None
        ci = (
            (math.exp(lr_mean - lr_half), math.exp(lr_mean + lr_half))
            if lr_mean is not None and lr_half is not None
            else None
        )
        t_mean, t_half = mean_ci(times)
        f_mean, f_half = mean_ci(fractions)
        a_mean, a_half = mean_ci(finals)
        rows.append(
            {
                "policy": policy,
                "seeds": len(finals),
                "reached": reached,
                "time_to_target_mean": t_mean,
                "time_to_target_ci95": t_half,
                "ratio_to_sync_geomean": ratio,
                "ratio_to_sync_ci95": ci,
                "faster": ci is not None and ci[1] < 1.0 and reached == len(finals),
                "slower": ci is not None and ci[0] > 1.0,
                "fraction_of_sync_wall_mean": f_mean,
                "fraction_of_sync_wall_ci95": f_half,
                "final_accuracy_mean": a_mean,
                "final_accuracy_ci95": a_half,
            }
        )
    return {"seeds": seeds, "window": window, "clock": clock, "rows": rows}


def power_markdown(power: dict[str, Any]) -> str:
    clock = power.get("clock", "wall")
    lines = [
        f"{len(power['seeds'])} paired seeds; target = the same seed's sync final accuracy (mean "
        f"of its last {power['window']} evals); times in RL {clock} seconds; ± = 95% confidence "
        "interval.",
        "",
        f"| policy | {clock} s to target | vs sync (geo-mean, 95% CI) | verdict | fraction of "
        f"sync's {clock} | final acc | reached |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in power["rows"]:
        ci = row["ratio_to_sync_ci95"]
        verdict = "faster" if row["faster"] else ("slower" if row["slower"] else "not different")
        if row["policy"] == "sync":
            verdict = "baseline"
        lines.append(
            f"| {row['policy']} | {_fmt(row['time_to_target_mean'], 1)} ± "
            f"{_fmt(row['time_to_target_ci95'], 1)} | {_fmt(row['ratio_to_sync_geomean'], 2)} "
            f"[{_fmt(ci[0] if ci else None, 2)}, {_fmt(ci[1] if ci else None, 2)}] | {verdict} | "
            f"{_fmt(row['fraction_of_sync_wall_mean'], 2)} ± "
            f"{_fmt(row['fraction_of_sync_wall_ci95'], 2)} | "
            f"{_fmt(row['final_accuracy_mean'])} ± {_fmt(row['final_accuracy_ci95'])} | "
            f"{row['reached']}/{row['seeds']} |"
        )
    return "\n".join(lines) + "\n"


def _mean_se(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return mean, se


def first_reach(evals: Sequence[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first evaluation whose accuracy is >= target (a small float tolerance), or None."""
    for point in evals:
        if point["accuracy"] >= target - 1e-9:
            return point
    return None


def final_accuracy(run: dict[str, Any], window: int = 1) -> float:
    """Mean accuracy of the run's last `window` evaluations (1: its final evaluation)."""
    points = run["evals"][-window:]
    return statistics.fmean(p["accuracy"] for p in points)


def analyse(
    summaries: Sequence[dict[str, Any]], policies: Sequence[str], final_window: int = 1
) -> dict[str, Any]:
    """The time-to-accuracy table from run summaries (one per policy and seed; sync required).

    A run's final accuracy is the mean of its last `final_window` evaluations; the target of a
    seed is its sync run's final accuracy; a run reaches it at its first evaluation >= target.
    """
    by, seeds = _runs_by_policy_and_seed(summaries)
    rows = []
    for policy in policies:
        finals, walls, cpus, reach_walls, reach_cpus, reach_steps = [], [], [], [], [], []
        fractions, ratios, cpu_ratios = [], [], []
        for seed in seeds:
            run, sync = by.get((policy, seed)), by[("sync", seed)]
            if run is None:
                continue
            target = final_accuracy(sync, final_window)
            finals.append(final_accuracy(run, final_window))
            walls.append(run["rl_wall_seconds"])
            cpus.append(run["rl_cpu_seconds"])
            hit = first_reach(run["evals"], target)
            sync_hit = first_reach(sync["evals"], target)
            assert sync_hit is not None  # a mean of sync's evaluations is <= their maximum
            if hit is None:
                continue
            reach_walls.append(hit["wall"])
            reach_cpus.append(hit["cpu"])
            reach_steps.append(hit["step"])
            fractions.append(hit["wall"] / sync["rl_wall_seconds"])
            if sync_hit["wall"] > 0:
                ratios.append(hit["wall"] / sync_hit["wall"])
            if sync_hit["cpu"] > 0:
                cpu_ratios.append(hit["cpu"] / sync_hit["cpu"])
        final_mean, final_se = _mean_se(finals)
        rows.append(
            {
                "policy": policy,
                "seeds": len(finals),
                "final_accuracy_mean": final_mean,
                "final_accuracy_se": final_se,
                "final_accuracies": finals,
                "rl_wall_mean": _mean_se(walls)[0],
                "rl_cpu_mean": _mean_se(cpus)[0],
                "reached": len(reach_walls),
                "time_to_target_mean": _mean_se(reach_walls)[0],
                "cpu_to_target_mean": _mean_se(reach_cpus)[0],
                "steps_to_target_mean": _mean_se(reach_steps)[0],
                # of sync's total RL wall time (the design target's measure), per seed, averaged
                "fraction_of_sync_wall_mean": _mean_se(fractions)[0],
                "fractions_of_sync_wall": fractions,
                # of the time sync itself first reached its final accuracy
                "ratio_to_sync_reach_mean": _mean_se(ratios)[0],
                "cpu_ratio_to_sync_reach_mean": _mean_se(cpu_ratios)[0],
            }
        )
    table = {row["policy"]: row for row in rows}
    verdict = None
    if "history" in table and len(seeds) > 0:
        hist, sync = table["history"], table["sync"]
        floor = sync["final_accuracy_mean"] - (sync["final_accuracy_se"] or 0.0)
        fraction = hist["fraction_of_sync_wall_mean"]
        verdict = {
            "time_fraction_target": TARGET_TIME_FRACTION,
            "history_reached_all_seeds": hist["reached"] == len(seeds),
            "history_fraction_of_sync_wall": fraction,
            # sync's own first reach of its final accuracy, as a fraction of its wall time: a
            # policy at this value is no faster than sync (an early plateau or a final dip of
            # sync makes the fraction small for every policy)
            "sync_fraction_of_own_wall": sync["fraction_of_sync_wall_mean"],
            "history_ratio_to_sync_reach": hist["ratio_to_sync_reach_mean"],
            "time_ok": hist["reached"] == len(seeds)
            and fraction is not None
            and fraction <= TARGET_TIME_FRACTION,
            "accuracy_floor": floor,
            "accuracy_ok": hist["final_accuracy_mean"] is not None
            and hist["final_accuracy_mean"] >= floor,
        }
        verdict["met"] = verdict["time_ok"] and verdict["accuracy_ok"]
    return {"seeds": seeds, "final_window": final_window, "rows": rows, "target": verdict}


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table_markdown(analysis: dict[str, Any]) -> str:
    """The time-to-accuracy table as Markdown."""
    window = analysis.get("final_window", 1)
    final = "final eval" if window == 1 else f"mean of last {window} evals"
    lines = [
        f"Final accuracy = {final}; target = the same seed's sync final accuracy.",
        "",
        "| policy | final acc (mean ± se) | RL wall s | time to sync's final acc s "
        "(reached) | fraction of sync wall | vs sync's own reach | steps to target | "
        "CPU-time ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in analysis["rows"]:
        lines.append(
            f"| {row['policy']} | {_fmt(row['final_accuracy_mean'])} ± "
            f"{_fmt(row['final_accuracy_se'])} | {_fmt(row['rl_wall_mean'], 1)} | "
            f"{_fmt(row['time_to_target_mean'], 1)} ({row['reached']}/{row['seeds']}) | "
            f"{_fmt(row['fraction_of_sync_wall_mean'], 2)} | "
            f"{_fmt(row['ratio_to_sync_reach_mean'], 2)} | "
            f"{_fmt(row['steps_to_target_mean'], 0)} | {_fmt(row['cpu_ratio_to_sync_reach_mean'], 2)} |"
        )
    target = analysis.get("target")
    if target:
        lines.append("")
        lines.append(
            f"history vs target: fraction of sync wall "
            f"{_fmt(target['history_fraction_of_sync_wall'], 2)} (target <= "
            f"{target['time_fraction_target']}, reached on every seed: "
            f"{target['history_reached_all_seeds']}); final accuracy floor (sync mean - se) "
            f"{_fmt(target['accuracy_floor'])}: {'ok' if target['accuracy_ok'] else 'below'}; "
            f"target met: {target['met']}. For scale: sync itself first reaches that accuracy at "
            f"{_fmt(target['sync_fraction_of_own_wall'], 2)} of its wall time, so history's time "
            f"relative to sync's own is {_fmt(target['history_ratio_to_sync_reach'], 2)}."
        )
    return "\n".join(lines) + "\n"


def plot_frontier(
    summaries: Sequence[dict[str, Any]], policies: Sequence[str], path: Path
) -> Path | None:
    """Eval accuracy vs RL wall time (and vs step), mean over seeds per policy; None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_time, ax_step) = plt.subplots(1, 2, figsize=(12, 4.5))
    sync_finals = [s["final_eval_accuracy"] for s in summaries if s["policy"] == "sync"]
    for policy in policies:
        runs = [s for s in summaries if s["policy"] == policy]
        if not runs:
            continue
        count = min(len(r["evals"]) for r in runs)
        wall = [statistics.fmean(r["evals"][i]["wall"] for r in runs) for i in range(count)]
        step = [runs[0]["evals"][i]["step"] for i in range(count)]
        acc = [statistics.fmean(r["evals"][i]["accuracy"] for r in runs) for i in range(count)]
        (line,) = ax_time.plot(wall, acc, marker="o", ms=3, label=f"{policy} (mean)")
        ax_step.plot(step, acc, marker="o", ms=3, color=line.get_color(), label=policy)
        for r in runs:
            ax_time.plot(
                [e["wall"] for e in r["evals"]],
                [e["accuracy"] for e in r["evals"]],
                color=line.get_color(),
                alpha=0.25,
                lw=0.8,
            )
    if sync_finals:
        for ax in (ax_time, ax_step):
            ax.axhline(statistics.fmean(sync_finals), color="gray", ls=":", lw=1)
    ax_time.set_xlabel("RL wall time (s, excl. SFT and eval)")
    ax_step.set_xlabel("RL step")
    for ax in (ax_time, ax_step):
        ax.set_ylabel("held-out greedy accuracy")
        ax.grid(alpha=0.3)
    ax_time.legend(loc="lower right", fontsize=8)
    ax_time.set_title("accuracy vs wall time (thin: single seeds)")
    ax_step.set_title("accuracy vs step (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """Runs the experiment; returns 0, or 2 for bad arguments (nothing written then)."""
    args = build_parser().parse_args(argv)
    try:
        policies = _parse_list(args.policies, "--policies")
        unknown = [p for p in policies if p not in POLICIES and p not in VARIANTS]
        if unknown:
            raise RecipeError(
                f"--policies: {unknown} not among {', '.join([*POLICIES, *VARIANTS])}"
            )
        if "sync" not in policies:
            raise RecipeError("--policies: must include sync (its final accuracy is the target)")
        try:
            seeds = [int(s) for s in _parse_list(args.seeds, "--seeds")]
        except ValueError as exc:
            raise RecipeError(f"--seeds: {args.seeds!r} is not a list of integers") from exc
        if args.quick:
            seeds = seeds[:1]
        overrides = list(args.overrides)
        if args.quick:
            overrides = [f"{k}={v}" for k, v in QUICK.items()] + overrides
        base = load_recipe(args.recipe or find_default_recipe(), overrides)
        out = Path(args.out)
        runs = plan_runs(base, policies, seeds, out, args.wandb_mode)
    except RecipeError as exc:
        print(f"frontier: error: {exc}", file=sys.stderr)
        return 2

    if args.reanalyse:
        results_path = out / "results.json"
        if not results_path.is_file():
            print(f"frontier: error: --reanalyse: no {results_path}", file=sys.stderr)
            return 2
        results = json.loads(results_path.read_text())
    else:
        out.mkdir(parents=True, exist_ok=True)
        results = run_experiment(base, runs, policies, seeds, args)
    report(results, out)
    return 0


def run_experiment(
    base: Recipe,
    runs: Sequence[Recipe],
    policies: Sequence[str],
    seeds: Sequence[int],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Runs every recipe in order; the results.json content without the analysis."""
    from rollout_accel.rollout.local import ensure_sft_checkpoint, run_recipe
    from rollout_accel.rollout.local.loop import SFT_CACHE

    started = time.time()
    load_before = os.getloadavg()
    for recipe in runs:  # warm starts first, so no run waits on SFT
        if run_label(recipe) == policies[0]:
            ensure_sft_checkpoint(recipe, Path(recipe.run.out_dir) / SFT_CACHE)
    summaries = []
    for index, recipe in enumerate(runs):
        print(f"[{index + 1}/{len(runs)}] {run_label(recipe)} seed {recipe.run.seed}", flush=True)
        load = os.getloadavg()[0]
        summary = run_recipe(recipe, progress=not args.no_progress).summary
        summary["policy"] = run_label(recipe)  # a variant's label, not its base policy
        # 1-minute load averages around the run: other work on the machine inflates wall time.
        summary["load_average_1m"] = [load, os.getloadavg()[0]]
        summaries.append(summary)
    return {
        "recipe": base.to_dict(),
        "policies": list(policies),
        "seeds": list(seeds),
        "quick": args.quick,
        "runs": summaries,
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": base.run.torch_threads,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "experiment_seconds": time.time() - started,
    }


def report(results: dict[str, Any], out: Path) -> None:
    """Adds the analyses to `results`, writes results.json (atomically), table.md, the plot."""
    policies, summaries = results["policies"], results["runs"]
    results["analysis"] = analyse(summaries, policies)
    results["analysis_smoothed"] = analyse(summaries, policies, SMOOTH_WINDOW)
    results["power"] = power_analysis(summaries, policies)
    results["power_cpu"] = power_analysis(summaries, policies, clock="cpu")
    plot = plot_frontier(summaries, policies, out / "frontier.png")
    results["plot"] = str(plot) if plot else None
    markdown = (
        "## Time to target, paired, 95% intervals\n\n"
        + power_markdown(results["power"])
        + "\n"
        + power_markdown(results["power_cpu"])
        + "\n## Time to accuracy\n\n"
        + table_markdown(results["analysis"])
        + "\n## Smoothed\n\n"
        + table_markdown(results["analysis_smoothed"])
    )
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out / "results.json")
    (out / "table.md").write_text(markdown)
    print(markdown)
    print(f"results: {out / 'results.json'}; plot: {plot}")


if __name__ == "__main__":
    raise SystemExit(main())
