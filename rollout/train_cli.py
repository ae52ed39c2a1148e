"""`rollout train RECIPE`: one local GRPO run from a TOML recipe (recipes/local/*.toml).

    rollout train recipes/local/arithmetic-sync.toml
    rollout train recipes/local/arithmetic-sync.toml --set rollout.policy=history --seed 1

Every flag is an override of a recipe key, applied before validation, so a bad value is reported
exactly like a bad recipe line: one message naming the key, exit status 2, nothing written.
"""

from __future__ import annotations

import argparse
import json
import sys

from rollout_accel.rollout.recipe import WANDB_MODES, Recipe, RecipeError, load_recipe


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rollout train",
        description="Run a local GRPO training recipe: SFT warm start, then RL with a rollout "
        "policy on the embedded engine; logs to W&B (offline by default) and JSON.",
    )
    parser.add_argument("recipe", help="recipe TOML file (e.g. recipes/local/arithmetic-sync.toml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set rollout.policy=history --set train.lr=1e-4",
    )
    parser.add_argument("--policy", help="shorthand for --set rollout.policy=...")
    parser.add_argument("--seed", type=int, help="shorthand for --set run.seed=...")
    parser.add_argument("--steps", type=int, help="shorthand for --set train.steps=...")
    parser.add_argument("--out", help="shorthand for --set run.out_dir=...")
    parser.add_argument(
        "--wandb-mode", choices=WANDB_MODES, help="shorthand for --set run.wandb_mode=..."
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--print-recipe",
        action="store_true",
        help="print the validated recipe as JSON and exit without training",
    )
    return parser


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The recipe file with `--set` overrides and the shorthand flags applied (in that order)."""
    overrides = list(args.overrides)
    shorthands = {
        "rollout.policy": args.policy,
        "run.seed": args.seed,
        "train.steps": args.steps,
        "run.out_dir": args.out,
        "run.wandb_mode": args.wandb_mode,
    }
    recipe = load_recipe(args.recipe, overrides)
    given = {k: v for k, v in shorthands.items() if v is not None}
    return recipe.with_updates(given) if given else recipe


def main(argv: list[str] | None = None) -> int:
    """Entry point of `rollout train`; returns the exit status (2 for a bad recipe)."""
    args = build_parser().parse_args(argv)
    try:
        recipe = recipe_from_args(args)
    except RecipeError as exc:
        print(f"rollout train: error: {exc}", file=sys.stderr)
        return 2
    if args.print_recipe:
        print(json.dumps(recipe.to_dict(), indent=2))
        return 0
    from rollout_accel.rollout.local import run_recipe

    result = run_recipe(recipe, progress=not args.no_progress)
    s = result.summary
    print(
        f"{s['run_name']} [{s['policy']}]: eval accuracy {s['initial_eval_accuracy']:.3f} -> "
        f"{s['final_eval_accuracy']:.3f} in {s['steps']} steps, "
        f"{s['rl_wall_seconds']:.1f}s RL wall time"
    )
    print(f"outputs: {result.run_dir} (summary.json, metrics.jsonl, wandb/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
