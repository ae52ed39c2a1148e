"""`rollout bench`: how much faster is my rollout step, and what does it cost — in one run.

Default: the `longtail` scenario on the embedded engine (tiny-qwen3 on the CPU): the policies
sync, dynamic, partial and history run K RL steps each on the same engine and the same seeded
synthetic long-tail workload, and one table compares them (ratios against sync included).

Recurrence (`--recurrence`): `realistic` (default) draws from 4,096 prompts, so at 32 groups per
step (48 in flight with over-sampling 1.5) a prompt comes back once every ~85-128 steps: no prompt
recurs within a bench run, as in the first epoch of dapo-math-17k (17.9k prompts: once per ~560
steps at 32 groups/step). `high` is the old setting (128 prompts: a prompt recurs every ~3-4
steps, which flatters history); `both` runs the two and prints two tables.

Other scenarios: `e2e` (real generation by a trained toy policy, no length trace),
`sampler` (history layer vs uniform selection on the trace, no engine), `frontier` (train under
each policy: time-to-accuracy), `engine` (our engine vs transformers), `server` (HTTP vs
in-process throughput).
`smshare` (prefill/decode SM sharing vs time-sharing, GPU only), `kvreuse` (cross-agent KV reuse
vs full prefill), `spec` (speculative decoding from earlier epochs), `pipeline` (pipeline-parallel
layer splits: even, best static, dynamic rebalancing), `slo` (schedule policies under bursty agent
traffic).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from rollout_accel.rollout.controller_config import POLICIES

# Scenario -> the module whose `main(argv)` runs it with the remaining flags; "" = the longtail
# runner below. A new scenario is one line here.
SCENARIOS: dict[str, str] = {
    "longtail": "",
    "e2e": "rollout_accel.rollout.bench.e2e",
    "sampler": "rollout_accel.sampling.evaluation",
    "frontier": "rollout_accel.rollout.frontier",
    "engine": "rollout_accel.serving.benchmark",
    "server": "rollout_accel.serving.http_benchmark",
    "smshare": "rollout_accel.rollout.bench.smshare_scenario",
    "kvreuse": "rollout_accel.rollout.bench.kvreuse_scenario",
    "spec": "rollout_accel.rollout.bench.spec",
    "pipeline": "rollout_accel.rollout.bench.pipeline_scenario",
    "slo": "rollout_accel.rollout.bench.slo_scenario",
}
# Data-set sizes of the two recurrence settings (module docstring).
RECURRENCE = {"realistic": 4096, "high": 128}


class OneLineParser(argparse.ArgumentParser):
    """Bad flags are reported in one line (usage stays behind --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"rollout bench: error: {message}\n")


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog="rollout bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--scenario",
        choices=list(SCENARIOS),
        default="longtail",
        help="what to measure (default: longtail); the others pass the remaining flags to their own runner",
    )
    w = p.add_argument_group("workload (longtail)")
    w.add_argument(
        "--workload",
        default="synthetic-longtail",
        help="synthetic-longtail (default), trace:FILE (JSONL replay, format in rollout_accel.rollout.bench.workloads), task:NAME (see --scenario frontier)",
    )
    w.add_argument(
        "--policies",
        default=",".join(POLICIES),
        help="comma-separated subset of sync,dynamic,partial,history (sync is the baseline of the ratios)",
    )
    w.add_argument(
        "--steps",
        type=int,
        default=8,
        help="RL steps per policy (history needs several; default 8)",
    )
    w.add_argument(
        "--rollout-batch-size",
        type=int,
        default=32,
        help="accepted groups per step (slime's --rollout-batch-size; default 32)",
    )
    w.add_argument(
        "--n-samples-per-prompt", type=int, default=8, help="samples per group (default 8)"
    )
    w.add_argument(
        "--max-len",
        type=int,
        default=256,
        help="response length cap; the trace's shape is rescaled to it (default 256 for CPU; 16384 is the published cap)",
    )
    w.add_argument(
        "--recurrence",
        choices=[*RECURRENCE, "both"],
        default="realistic",
        help="realistic: 4096 prompts, none recurs within the run (default); high: 128 prompts, "
        "a prompt recurs every ~4 steps (the old setting); both: one table each",
    )
    w.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        help="prompts in the data set (overrides --recurrence); epochs cycle over them",
    )
    w.add_argument(
        "--over-sampling",
        type=float,
        default=1.5,
        help="groups in flight / target for dynamic, partial, history (default 1.5)",
    )
    w.add_argument(
        "--max-staleness",
        type=int,
        default=1,
        help="rollout steps a partial sample may span (default 1)",
    )
    w.add_argument(
        "--history-filter",
        action="store_true",
        help="run history with the dynamic (non-zero-variance) filter too (default: off, as for "
        "partial; dynamic is the filtering policy)",
    )
    w.add_argument(
        "--tail-budget",
        type=float,
        default=None,
        metavar="F",
        help="max-of-n tail for every policy: once 3/4 of a group is done, the rest may run F x "
        "its longest finished sibling; cut samples count as truncated (default off)",
    )
    w.add_argument(
        "--drafts",
        action="store_true",
        help="speculative decoding from history drafts for every policy (needs engine support)",
    )
    w.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)"
    )
    w.add_argument("--seed", type=int, default=0, help="workload and prompt-order seed (default 0)")
    e = p.add_argument_group("engines (longtail)")
    e.add_argument(
        "--engine", choices=["embedded"], default="embedded", help="in-process engine (default)"
    )
    e.add_argument(
        "--model-path",
        default="tiny-qwen3",
        help="model for embedded / Ray engines: preset or HF-layout dir",
    )
    e.add_argument(
        "--engine-url",
        default=None,
        help="comma-separated SGLang-protocol server URLs (ours or real SGLang; a router URL is expanded to its workers)",
    )
    e.add_argument("--api-key", default=None, help="bearer key for --engine-url servers")
    e.add_argument(
        "--ray",
        type=int,
        default=0,
        metavar="N",
        help="N Ray actor engines (local ray.init unless --ray-address)",
    )
    e.add_argument("--ray-address", default=None, help="Ray cluster address")
    e.add_argument(
        "--concurrency",
        type=int,
        default=512,
        help="in-flight requests per engine (slime's --sglang-server-concurrency)",
    )
    o = p.add_argument_group("outputs")
    o.add_argument(
        "--out",
        default="bench-out",
        help="directory for results.json and plots (default bench-out)",
    )
    o.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument(
        "--wandb",
        action="store_true",
        help="log to Weights & Biases (slime-compatible metric names)",
    )
    o.add_argument(
        "--wandb-mode",
        default=None,
        choices=["online", "offline", "disabled"],
        help="default: offline unless WANDB_API_KEY is set",
    )
    o.add_argument("--wandb-project", default="rollout-accel-bench", help="W&B project")
    return p


async def _make_pool(args: argparse.Namespace):
    from rollout_accel.rollout.pool import EnginePool

    if args.engine_url:
        from rollout_accel.rollout.pool import HttpEngine, expand_router

        urls: list[str] = []
        for url in args.engine_url.split(","):
            urls.extend(await expand_router(url.strip(), args.api_key))
        engines = [HttpEngine(u, args.api_key) for u in urls]
        if getattr(args, "drafts", False):
            for engine in engines:  # ask each server whether it drafts (for require_drafts)
                await engine.drafting()
        return EnginePool(engines, args.concurrency), {
            "kind": "http",
            "targets": urls,
        }
    if args.ray:
        from rollout_accel.rollout.pool.ray_actors import start_ray_engines

        handles = start_ray_engines(
            args.ray, {"model_path": args.model_path}, address=args.ray_address
        )
        return EnginePool(handles, args.concurrency), {
            "kind": "ray",
            "targets": [h.name for h in handles],
            "model_path": args.model_path,
        }
    from rollout_accel.rollout.pool import InProcessEngine
    from rollout_accel.serving.engine import Engine

    engine = Engine(
        args.model_path,
        max_running_requests=min(args.concurrency, 512),
        cuda_graph_max_bs=min(args.concurrency, 512),
        # Long enough for any prompt of the workload plus max_len; a tighter context keeps the
        # request table (and the GPU's per-step block-table copy) small.
        context_length=args.max_len + 2048,
        # --drafts: the embedded engine drafts from corpora, siblings and the request itself.
        speculative_algorithm="NGRAM" if getattr(args, "drafts", False) else None,
    )
    return EnginePool([InProcessEngine(engine, owns_engine=True)], args.concurrency), {
        "kind": "embedded",
        "targets": [str(engine.device)],
        "model_path": args.model_path,
    }


def _validate(args: argparse.Namespace, parser: OneLineParser) -> tuple[str, ...]:
    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        parser.error(
            f"--policies: {unknown[0] if unknown else '(empty)'!r} is not one of {','.join(POLICIES)}"
        )
    for name in ("steps", "rollout_batch_size", "n_samples_per_prompt", "num_prompts"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be >= 1")
    if args.max_len < 8:
        parser.error("--max-len: must be >= 8")
    if args.over_sampling < 1.0:
        parser.error("--over-sampling: must be >= 1.0")
    if args.engine_url and args.ray:
        parser.error("--engine-url and --ray are alternatives; give one")
    if args.tail_budget is not None and args.tail_budget < 1.0:
        parser.error("--tail-budget: must be >= 1.0")
    if args.num_prompts is not None and args.recurrence == "both":
        parser.error("--num-prompts and --recurrence both are alternatives; give one")
    return policies


def require_drafts(pool) -> None:
    """--drafts: every engine of the pool must do speculative decoding from drafts."""
    from rollout_accel.rollout.pool.base import supports_drafts

    missing = [e.handle.name for e in pool.engines if not supports_drafts(e.handle)]
    if missing:
        raise SystemExit(
            f"rollout bench: error: --drafts: engine {missing[0]} does no speculative decoding "
            f"(start it with --speculative-algorithm NGRAM)"
        )


def _machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _log_wandb(args: argparse.Namespace, runs, rows, payload: dict[str, Any]) -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    mode = args.wandb_mode or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    group = f"bench-{int(time.time())}"
    for run in runs:
        wb = wandb.init(
            project=args.wandb_project,
            group=group,
            name=run.policy,
            mode=mode,
            dir=str(Path(args.out)),
            config={**payload["settings"], "policy": run.policy, "workload": payload["workload"]},
            reinit="finish_previous",
        )
        wb.define_metric("rollout/step")
        wb.define_metric("*", step_metric="rollout/step")
        for step in run.steps:
            wb.log({**step.metrics, "rollout/step": step.step})
        row = next(r for r in rows if r["policy"] == run.policy)
        wb.summary.update({f"bench/{k}": v for k, v in row.items() if k != "policy"})
        wb.finish()


def _delegate(scenario: str, rest: list[str]) -> int:
    import importlib

    result = importlib.import_module(SCENARIOS[scenario]).main(rest)
    return result if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if "--scenario" in argv:
        at = argv.index("--scenario")
        scenario = argv[at + 1] if at + 1 < len(argv) else ""
        if scenario in SCENARIOS and scenario != "longtail":
            return _delegate(scenario, argv[:at] + argv[at + 2 :])
    args = parser.parse_args(argv)
    policies = _validate(args, parser)
    from rollout_accel.rollout.bench.report import (
        print_table,
        summarize,
        table_text,
        write_plots,
        write_results,
    )
    from rollout_accel.rollout.bench.runner import BenchSettings, run_bench
    from rollout_accel.rollout.bench.workloads import WorkloadError, make_workload

    if args.num_prompts is not None:
        sizes = {"custom": args.num_prompts}
    elif args.recurrence == "both":
        sizes = dict(RECURRENCE)
    else:
        sizes = {args.recurrence: RECURRENCE[args.recurrence]}
    all_settings = {
        name: BenchSettings(
            policies=policies,
            steps=args.steps,
            rollout_batch_size=args.rollout_batch_size,
            n_samples_per_prompt=args.n_samples_per_prompt,
            max_len=args.max_len,
            num_prompts=size,
            over_sampling=args.over_sampling,
            max_staleness=args.max_staleness,
            temperature=args.temperature,
            seed=args.seed,
            history_filter=args.history_filter,
            tail_budget=args.tail_budget,
            drafts=args.drafts,
        )
        for name, size in sizes.items()
    }
    out = Path(args.out)

    async def run() -> tuple[dict[str, tuple[list, dict[str, Any]]], dict[str, Any]]:
        pool, engine_info = await _make_pool(args)
        try:
            if args.drafts:
                require_drafts(pool)
            vocab = 512
            if engine_info["kind"] == "embedded":
                vocab = pool.engines[0].handle.engine.model_config.vocab_size
            progress = None
            task = None
            if not args.no_progress:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                )

                progress = Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                )
                progress.start()
                total = len(policies) * args.steps * len(all_settings)
                task = progress.add_task("rollout bench", total=total)

            def on_step(policy: str, step: int, metrics: dict[str, float]) -> None:
                if progress is not None:
                    progress.update(
                        task,
                        advance=1,
                        description=f"{policy:8s} step {step} {metrics['perf/rollout_time']:.2f}s",
                    )

            results = {}
            try:
                for name, settings in all_settings.items():
                    try:
                        workload = make_workload(
                            args.workload,
                            num_prompts=settings.num_prompts,
                            n=args.n_samples_per_prompt,
                            max_len=args.max_len,
                            seed=args.seed,
                            vocab_size=min(vocab, 32000),
                        )
                    except WorkloadError as exc:
                        raise SystemExit(f"rollout bench: error: {exc}") from None
                    runs = await run_bench(pool, workload, settings, on_step)
                    results[name] = (runs, workload.describe())
            finally:
                if progress is not None:
                    progress.stop()
            return results, engine_info
        finally:
            await pool.close()

    results, engine_info = asyncio.run(run())
    from dataclasses import asdict

    texts = []
    for index, (name, (runs, workload_info)) in enumerate(results.items()):
        settings = all_settings[name]
        rows = summarize(runs)
        payload = {
            "schema": 1,
            "scenario": "longtail",
            "recurrence": name,
            "workload": workload_info,
            "settings": asdict(settings),
            "engine": engine_info,
            "machine": _machine(),
            "summary": rows,
            "steps": {
                r.policy: [
                    {"step": s.step, "metrics": s.metrics, "spans": s.spans} for s in r.steps
                ]
                for r in runs
            },
        }
        # The first setting is results.json (the default, realistic); others results-<name>.json.
        where = out / ("results.json" if index == 0 else f"results-{name}.json")
        write_results(where, payload)
        if not args.no_plots and index == 0:
            write_plots(out, runs, rows)
        if args.wandb and index == 0:
            _log_wandb(args, runs, rows, payload)
        title = (
            f"rollout bench: {workload_info['name']} ({name} recurrence: "
            f"{settings.num_prompts} prompts), {args.rollout_batch_size} groups x "
            f"{args.n_samples_per_prompt}, max_len {args.max_len}, {args.steps} steps, "
            f"{engine_info['kind']} engine"
        )
        texts.append(f"{title}\n{table_text(rows)}")
        print_table(rows, title)
        for row in rows:
            if row["policy"] != "sync" and row["speedup_vs_sync"] == row["speedup_vs_sync"]:
                print(
                    f"{row['policy']}: step time {row['step_time_ratio_vs_sync']:.2f} of sync "
                    f"({row['speedup_vs_sync']:.2f}x faster)"
                )
        print(f"results: {where}")
    (out / "table.txt").write_text("\n\n".join(texts) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
