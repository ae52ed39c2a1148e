"""The bench's outputs: the comparison table, results.json and PNG plots.

results.json schema (version 1):
  {"schema": 1, "scenario", "workload": {...trace parameters}, "settings": {...BenchSettings},
   "engine": {"kind", "targets", "model_path"}, "machine": {...},
   "summary": [{"policy", "step_time_s", "step_time_ratio_vs_sync", "speedup_vs_sync",
                "cpu_time_s", "cpu_speedup_vs_sync",
                "tokens_per_s", "effective_groups_per_s", "idle_share", "tail_ratio",
                "aborted_tokens_per_step", "resumed_tokens_per_step", "discarded_tokens_per_step",
                "skip_rate", "deferred_prompts", "tail_cut_per_step", "length_pred_spearman",
                "effective_share"}],
   "steps": {policy: [{"step", "metrics": {...every controller metric},
                        "spans": [{"engine", "start", "end", "finish", "tokens"}]}]}}
Means are over steps 1..K-1 for the rate and time columns (step 0 has no history and no carried
partials for any policy), counts are per-step means over all steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rollout_accel.rollout.bench.runner import PolicyRun

COLUMNS = [
    ("step_time_s", "step s", "{:.2f}"),
    ("speedup_vs_sync", "vs sync", "{:.2f}x"),
    ("cpu_time_s", "cpu s", "{:.2f}"),
    ("cpu_speedup_vs_sync", "cpu vs sync", "{:.2f}x"),
    ("tokens_per_s", "tok/s", "{:.0f}"),
    ("effective_groups_per_s", "eff grp/s", "{:.2f}"),
    ("effective_share", "eff share", "{:.2f}"),
    ("idle_share", "idle", "{:.2f}"),
    ("tail_ratio", "tail", "{:.1f}"),
    ("aborted_tokens_per_step", "aborted", "{:.0f}"),
    ("resumed_tokens_per_step", "resumed", "{:.0f}"),
    ("discarded_tokens_per_step", "discarded", "{:.0f}"),
    ("skip_rate", "skip", "{:.2f}"),
    ("deferred_prompts", "deferred", "{:.0f}"),
    ("tail_cut_per_step", "cut", "{:.1f}"),
    ("length_pred_spearman", "len rho", "{:.2f}"),
]


def summarize(runs: list[PolicyRun]) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        steps = max(1, len(run.steps))
        accepted = run.mean("accel/accepted_groups")
        rows.append(
            {
                "policy": run.policy,
                "step_time_s": run.mean("perf/rollout_time", skip_first=True),
                "cpu_time_s": run.mean("perf/rollout_cpu_time", skip_first=True),
                "tokens_per_s": run.mean("accel/generated_tokens_per_s", skip_first=True),
                "effective_groups_per_s": run.mean("accel/effective_groups_per_s", skip_first=True),
                "effective_share": run.mean("accel/effective_groups") / accepted
                if accepted
                else float("nan"),
                "idle_share": run.mean("accel/idle_share", skip_first=True),
                "tail_ratio": run.mean("accel/tail_ratio", skip_first=True),
                "aborted_tokens_per_step": run.total("accel/aborted_tokens") / steps,
                "resumed_tokens_per_step": run.total("accel/resumed_tokens") / steps,
                "discarded_tokens_per_step": run.total("accel/discarded_tokens") / steps,
                "skip_rate": run.mean("accel/skip_rate"),
                # Prompts put off (deferred or pooled) and not yet run when the run ended: work
                # the step times above do not include.
                "deferred_prompts": run.steps[-1].metrics.get("accel/deferred_prompts", 0.0)
                if run.steps
                else 0.0,
                "tail_cut_per_step": run.total("accel/tail_cut_samples") / steps,
                "length_pred_spearman": run.mean("accel/length_pred_spearman", skip_first=True),
            }
        )
    base = next((r for r in rows if r["policy"] == "sync"), None)
    for row in rows:
        if base and row["step_time_s"] > 0:
            row["step_time_ratio_vs_sync"] = row["step_time_s"] / base["step_time_s"]
            row["speedup_vs_sync"] = base["step_time_s"] / row["step_time_s"]
        else:
            row["step_time_ratio_vs_sync"] = row["speedup_vs_sync"] = float("nan")
        cpu = row["cpu_time_s"]
        row["cpu_speedup_vs_sync"] = (
            base["cpu_time_s"] / cpu if base and cpu == cpu and cpu > 0 else float("nan")
        )
    return rows


def _fmt(fmt: str, value: Any) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return fmt.format(value)


def table_text(
    rows: list[dict[str, Any]], columns: list[tuple[str, str, str]] | None = None
) -> str:
    """A plain fixed-width table (also what goes into the README)."""
    columns = columns or COLUMNS
    header = ["policy"] + [title for _, title, _ in columns]
    body = [[row["policy"]] + [_fmt(fmt, row[key]) for key, _, fmt in columns] for row in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *body]
    ]
    return "\n".join(lines)


def print_table(
    rows: list[dict[str, Any]], title: str, columns: list[tuple[str, str, str]] | None = None
) -> None:
    columns = columns or COLUMNS
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a dependency
        print(title)
        print(table_text(rows, columns))
        return
    table = Table(title=title)
    table.add_column("policy")
    for _, name, _ in columns:
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(row["policy"], *[_fmt(fmt, row[key]) for key, _, fmt in columns])
    Console(width=160).print(table)


def write_results(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=_json_default))
    tmp.replace(path)
    return path


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def write_plots(out: Path, runs: list[PolicyRun], rows: list[dict[str, Any]]) -> list[Path]:
    """timeline.png (per-engine Gantt of the last step of each policy, aborts in red),
    step_time.png and effective_groups.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 2.6 * len(runs)), squeeze=False)
    horizon = max(
        (s["end"] for r in runs for s in (r.steps[-1].spans if r.steps else [])), default=1.0
    )
    for ax, run in zip(axes[:, 0], runs, strict=True):
        spans = run.steps[-1].spans if run.steps else []
        engines = sorted({s["engine"] for s in spans})
        y = 0
        for engine_index, engine in enumerate(engines):
            mine = sorted((s for s in spans if s["engine"] == engine), key=lambda s: s["start"])
            for span in mine:
                color = (
                    "tab:red"
                    if span["finish"] == "abort"
                    else ("tab:gray" if span["finish"] == "failed" else f"C{engine_index % 10}")
                )
                ax.hlines(y, span["start"], span["end"], colors=color, linewidth=1.2)
                y += 1
            y += 3
        ax.set_xlim(0, horizon * 1.02)
        ax.set_ylabel("requests")
        ax.set_title(f"{run.policy}: request timeline, last step (red = aborted)", fontsize=9)
        ax.set_yticks([])
    axes[-1, 0].set_xlabel("seconds since step start")
    fig.tight_layout()
    paths.append(out / "timeline.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        ax.plot(
            [s.step for s in run.steps],
            [s.metrics["perf/rollout_time"] for s in run.steps],
            marker="o",
            label=run.policy,
        )
    ax.set_xlabel("rollout step")
    ax.set_ylabel("rollout step time (s)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "step_time.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(
        [r["policy"] for r in rows],
        [r["effective_groups_per_s"] for r in rows],
        color=[f"C{i}" for i in range(len(rows))],
    )
    ax.set_ylabel("effective (non-zero-variance) groups / s")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    paths.append(out / "effective_groups.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
