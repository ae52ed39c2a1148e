"""The local RL loop: tokenizer export, recipe validation, weight pushes, a short real run."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from rollout_accel.rollout import train_cli
from rollout_accel.rollout.local import (
    build_engine,
    build_model,
    ensure_sft_checkpoint,
    load_policy,
    push_weights,
    save_policy_dir,
    train_groups,
)
from rollout_accel.rollout.local.loop import SFT_CACHE
from rollout_accel.rollout.pool import EnginePool, HttpEngine, InProcessEngine
from rollout_accel.rollout.recipe import RecipeError, load_recipe, recipe_from_dict
from rollout_accel.rollout.sample_types import Sample
from rollout_accel.rollout.tasks import CharTokenizer, get_task
from rollout_accel.rollout.tasks.tokenizer import CHARACTERS
from rollout_accel.serving.models import TextTokenizer

# Sorting 2-4 digits without a scratchpad: a 200-step SFT leaves greedy accuracy mid-range, and
# GRPO sharpens it within a few steps. Seed 1 is fixed; the engine's sampling is seeded, so the
# run is reproducible (it measured 0.55 -> 0.81 after 5 steps -> 0.88 after 10).
SMALL_RECIPE = """
[task]
name = "sorting"
options = { min_len = 2, max_len = 4, scratchpad = false }
train_size = 128
sft_size = 512

[rollout]
policy = "sync"
rollout_batch_size = 16
n = 8
max_new_tokens = 16

[train]
steps = 10
lr = 5e-4
sft_steps = 200
sft_lr = 3e-3

[eval]
every = 5
size = 128

[run]
seed = 1
wandb_mode = "offline"
"""


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls gain nothing from threads; on a busy 2-core box two threads run slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("local")


@pytest.fixture(scope="module")
def small_recipe_path(workdir):
    path = workdir / "small.toml"
    path.write_text(SMALL_RECIPE + f'out_dir = "{workdir / "runs"}"\n')
    return path


@pytest.fixture(scope="module")
def small_recipe(small_recipe_path):
    return load_recipe(small_recipe_path)


@pytest.fixture(scope="module")
def sft_dir(small_recipe):
    path, meta = ensure_sft_checkpoint(small_recipe, f"{small_recipe.run.out_dir}/{SFT_CACHE}")
    assert not meta["cached"] and meta["losses"][-1] < meta["losses"][0]
    return path


# -- tokenizer export ---------------------------------------------------------------------------


def test_tokenizer_export_round_trips_through_the_engine_tokenizer(tmp_path) -> None:
    char = CharTokenizer()
    char.save_hf(tmp_path)
    hf = TextTokenizer.from_dir(tmp_path)
    assert hf.vocab_size == char.vocab_size
    assert hf.special_ids == char.special_ids
    text = f"<bos>{CHARACTERS}<pad>12+7=19#19<eos>"
    ids = char.encode(text)
    assert hf.encode(text) == ids
    assert hf.decode(ids, skip_special_tokens=False) == text
    assert hf.decode(ids) == char.decode(ids)
    assert [hf.token_text(i) for i in range(char.vocab_size)] == list(char.vocab)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"] == "<eos>"


def test_engine_decodes_with_the_task_tokenizer(sft_dir, small_recipe) -> None:
    task = get_task(small_recipe.task.name, **small_recipe.task.options)
    engine = build_engine(sft_dir, small_recipe)
    try:
        prompts = [task.encode_prompt(p) for p in task.eval_prompts(4)]
        outs = engine.generate(
            input_ids=prompts,
            sampling_params={"temperature": 0.0, "max_new_tokens": 16},
            return_logprob=True,
            return_text_in_logprobs=True,
        )
    finally:
        engine.shutdown()
    for out in outs:
        ids = out["output_ids"]
        assert ids and out["text"] == task.tokenizer.decode(ids)
        assert "#" in out["text"]  # the SFT'd format
        assert ids[-1] == task.tokenizer.eos_id  # stops on the task's <eos>
        triples = out["meta_info"]["output_token_logprobs"]
        assert [t[2] for t in triples] == [task.tokenizer.vocab[i] for i in ids]


# -- recipes ------------------------------------------------------------------------------------

BAD_RECIPES = [
    ("[rollout]\npolcy = 'sync'\n", "rollout.polcy"),
    ("[train]\nsteps = 'ten'\n", "train.steps"),
    ("[train]\nlr = true\n", "train.lr"),
    ("[task]\nname = 'chess'\n", "task.name"),
    ("[rollout]\npolicy = 'fastest'\n", "rollout.policy"),
    ("[task]\noptions = { max_stepz = 3 }\n", "task.options.max_stepz"),
    ("[task]\noptions = { max_steps = '3' }\n", "task.options.max_steps"),
    ("[trainer]\nsteps = 3\n", "trainer"),
    ("[eval]\nsize = 0\n", "eval.size"),
]


@pytest.mark.parametrize(("text", "key"), BAD_RECIPES)
def test_bad_recipe_gives_one_error_naming_the_key(text, key, tmp_path, capsys) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(f"{key}:") and "\n" not in message
    out_dir = tmp_path / "out"
    assert train_cli.main([str(path), "--out", str(out_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and f"error: {key}:" in err
    assert not out_dir.exists()  # validated before anything is written


def test_cli_overrides_are_validated_like_recipe_lines(tmp_path, capsys) -> None:
    path = tmp_path / "ok.toml"
    path.write_text("[rollout]\npolicy = 'sync'\n")
    assert train_cli.main([str(path), "--set", "rollout.policy=fastest"]) == 2
    assert "error: rollout.policy:" in capsys.readouterr().err
    assert train_cli.main([str(path), "--set", "rollout.n=1"]) == 2
    assert "error: rollout.n:" in capsys.readouterr().err
    assert train_cli.main([str(path), "--print-recipe", "--policy", "history", "--seed", "3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["rollout"]["policy"] == "history" and printed["run"]["seed"] == 3
    assert printed["run"]["name"] == "ok"


def test_shipped_recipes_differ_only_in_policy() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "recipes" / "local"
    sync = load_recipe(root / "arithmetic-sync.toml")
    history = load_recipe(root / "arithmetic-history.toml")
    assert (sync.rollout.policy, history.rollout.policy) == ("sync", "history")
    assert history.with_updates({"rollout.policy": "sync", "run.name": sync.run.name}) == sync


# -- weights ------------------------------------------------------------------------------------


def test_train_groups_keep_the_loss_mask() -> None:
    sample = Sample(
        tokens=[1, 5, 6, 20, 21, 22, 2],
        response_length=4,
        rollout_log_probs=[-0.1, -0.2, -0.3, -0.4],
        loss_mask=[0, 0, 1, 1],
        reward=1.0,
        metadata={"prompt_length": 3},
    )
    other = Sample(
        tokens=[1, 5, 6, 2],
        response_length=1,
        rollout_log_probs=[-0.5],
        loss_mask=[1],
        reward=0.0,
        metadata={"prompt_length": 3},
    )
    ((first, second),) = train_groups([[sample, other]])
    assert first.prompt_ids == [1, 5, 6] and first.response_ids == [20, 21, 22, 2]
    assert first.loss_mask == [0, 0, 1, 1] and first.rollout_logprobs == [-0.1, -0.2, -0.3, -0.4]
    assert (first.reward, second.reward) == (1.0, 0.0)


@pytest.mark.parametrize("kind", ["inprocess", "http"])
def test_pushed_weights_change_the_engines_greedy_outputs(kind, sft_dir, small_recipe, tmp_path):
    task = get_task(small_recipe.task.name, **small_recipe.task.options)
    random_dir = save_policy_dir(build_model(small_recipe, task), task, tmp_path / "random")
    prompts = [task.encode_prompt(p) for p in task.eval_prompts(8)]
    params = {"temperature": 0.0, "max_new_tokens": 12}

    reference_engine = build_engine(sft_dir, small_recipe)
    try:
        reference = [
            o["output_ids"]
            for o in reference_engine.generate(input_ids=prompts, sampling_params=params)
        ]
    finally:
        reference_engine.shutdown()

    engine = build_engine(random_dir, small_recipe)
    server = None
    if kind == "http":
        from rollout_accel.serving.server import ServerThread

        server = ServerThread(engine=engine).start()
        handle = HttpEngine(server.url)
    else:
        handle = InProcessEngine(engine)

    async def scenario() -> tuple[list, list]:
        pool = EnginePool([handle])
        try:
            payload = lambda ids: {"input_ids": ids, "sampling_params": params}  # noqa: E731
            before = await asyncio.gather(*(pool.generate(payload(p)) for p in prompts))
            await push_weights(pool, load_policy(sft_dir), 7)
            after = await asyncio.gather(*(pool.generate(payload(p)) for p in prompts))
            return before, after
        finally:
            await pool.close()

    try:
        before, after = asyncio.run(scenario())
    finally:
        if server is not None:
            server.stop()
        engine.shutdown()
    before_ids = [o["output_ids"] for o in before]
    after_ids = [o["output_ids"] for o in after]
    assert before_ids != after_ids
    assert after_ids == reference  # exactly what an engine loaded from those weights says
    assert {o["meta_info"]["weight_version"] for o in before} == {"0"}
    assert {o["meta_info"]["weight_version"] for o in after} == {"7"}


# -- a real run ---------------------------------------------------------------------------------


def test_short_run_raises_eval_accuracy_over_the_sft_start(
    small_recipe_path, small_recipe, sft_dir, capsys
):
    assert train_cli.main([str(small_recipe_path), "--no-progress"]) == 0
    assert "eval accuracy" in capsys.readouterr().out
    run_dir = small_recipe.run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sft_cached"]  # the fixture built it; the run reused it
    evals = [e["accuracy"] for e in summary["evals"]]
    assert [e["step"] for e in summary["evals"]] == [0, 5, 10]
    assert evals[-1] >= evals[0] + 0.1, evals
    assert summary["final_eval_accuracy"] == evals[-1]
    assert summary["rl_wall_seconds"] > 0
    assert 0.0 < summary["step_means"]["accel/effective_groups"] <= 16

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/loss" in r]
    assert [r["rollout/step"] for r in steps] == list(range(10))
    assert [r["train/step"] for r in steps] == list(range(1, 11))
    walls = [r["time/wall"] for r in steps]
    assert walls == sorted(walls) and walls[-1] == pytest.approx(summary["rl_wall_seconds"])
    assert all(0.0 <= r["rollout/raw_reward"] <= 1.0 for r in steps)
    assert records[-1] == {"summary": records[-1]["summary"]}

    assert list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))  # W&B offline by default
    assert json.loads((run_dir / "recipe.json").read_text()) == small_recipe.to_dict()
    leftovers = [p.name for p in run_dir.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no staging or failed directories


def test_recipe_round_trips_through_its_dict(small_recipe) -> None:
    assert recipe_from_dict(small_recipe.to_dict()) == small_recipe


# -- the frontier experiment's arithmetic -------------------------------------------------------


def _summary(policy: str, seed: int, accs: list[float], wall_per_step: float) -> dict:
    evals = [
        {
            "step": 10 * i,
            "wall": 10 * i * wall_per_step,
            "cpu": 10 * i * wall_per_step,
            "accuracy": a,
        }
        for i, a in enumerate(accs)
    ]
    return {
        "policy": policy,
        "seed": seed,
        "evals": evals,
        "final_eval_accuracy": accs[-1],
        "rl_wall_seconds": evals[-1]["wall"],
        "rl_cpu_seconds": evals[-1]["cpu"],
    }


def test_frontier_time_to_accuracy_is_paired_by_seed() -> None:
    from rollout_accel.rollout.frontier import analyse, table_markdown

    summaries = [
        _summary("sync", 0, [0.5, 0.6, 0.7, 0.8], 1.0),  # target 0.8, reached at 30 s of 30 s
        _summary("history", 0, [0.5, 0.8, 0.8, 0.9], 1.5),  # 0.8 at 15 s
        _summary("sync", 1, [0.2, 0.4, 0.3, 0.3], 1.0),  # target 0.3, first reached at 10 s
        _summary("history", 1, [0.2, 0.2, 0.3, 0.4], 1.5),  # 0.3 at 30 s
    ]
    result = analyse(summaries, ["sync", "history"])
    sync, history = result["rows"]
    assert history["fractions_of_sync_wall"] == pytest.approx([15 / 30, 30 / 30])
    assert history["fraction_of_sync_wall_mean"] == pytest.approx(0.75)
    assert history["ratio_to_sync_reach_mean"] == pytest.approx((15 / 30 + 30 / 10) / 2)
    assert sync["final_accuracy_mean"] == pytest.approx(0.55)
    assert sync["final_accuracy_se"] == pytest.approx(0.25)  # stdev 0.354 / sqrt(2)
    assert history["final_accuracy_mean"] == pytest.approx(0.65)
    assert result["target"]["accuracy_ok"] and not result["target"]["time_ok"]
    assert not result["target"]["met"]
    smoothed = analyse(summaries, ["sync", "history"], final_window=2)
    assert smoothed["rows"][0]["final_accuracies"] == pytest.approx([0.75, 0.3])
    assert "| history |" in table_markdown(result)
    never = _summary("history", 0, [0.5, 0.6, 0.6, 0.6], 1.0)
    row = analyse([summaries[0], never], ["sync", "history"])["rows"][1]
    assert row["reached"] == 0 and row["fraction_of_sync_wall_mean"] is None


def test_frontier_runs_one_recipe_per_policy_and_seed(small_recipe, tmp_path) -> None:
    from rollout_accel.rollout.frontier import plan_runs

    runs = plan_runs(small_recipe, ["sync", "history"], [0, 1], tmp_path, "disabled")
    assert [(r.rollout.policy, r.run.seed) for r in runs] == [
        ("sync", 0),
        ("history", 0),
        ("history", 1),
        ("sync", 1),
    ]
    for r in runs:  # only the policy, seed and output place differ from the base recipe
        same = r.with_updates(
            {
                "rollout.policy": small_recipe.rollout.policy,
                "run.seed": small_recipe.run.seed,
                "run.name": small_recipe.run.name,
                "run.out_dir": small_recipe.run.out_dir,
                "run.wandb_mode": small_recipe.run.wandb_mode,
            }
        )
        assert same == small_recipe


def test_frontier_power_analysis_pairs_seeds_and_gives_intervals(tmp_path) -> None:
    from rollout_accel.rollout.frontier import (
        VARIANTS,
        plan_runs,
        power_analysis,
        power_markdown,
        run_label,
        t975,
    )

    def summ(policy: str, seed: int, accs: list[float], wall: float) -> dict:
        n = len(accs)
        evals = [
            {"step": i, "wall": wall * i / (n - 1), "cpu": 0.0, "accuracy": a}
            for i, a in enumerate(accs)
        ]
        return {"policy": policy, "seed": seed, "rl_wall_seconds": wall, "evals": evals}

    runs = []
    for seed in range(5):
        runs.append(summ("sync", seed, [0.1, 0.3, 0.5, 0.6, 0.6, 0.6], 100.0))
        # reaches sync's final accuracy one eval earlier, on every seed
        runs.append(summ("history", seed, [0.1, 0.5, 0.6, 0.6, 0.6, 0.6], 100.0 + seed))
        # faster on some seeds, slower on others: the interval must straddle 1
        late = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6] if seed % 2 else [0.1] + [0.6] * 5
        runs.append(summ("partial", seed, late, 100.0))
    power = power_analysis(runs, ["sync", "history", "partial"])
    rows = {r["policy"]: r for r in power["rows"]}
    assert rows["history"]["faster"] and not rows["history"]["slower"]
    low, high = rows["history"]["ratio_to_sync_ci95"]
    assert low < rows["history"]["ratio_to_sync_geomean"] < high < 1.0
    assert not rows["partial"]["faster"] and not rows["partial"]["slower"]
    assert rows["partial"]["ratio_to_sync_ci95"][0] < 1.0 < rows["partial"]["ratio_to_sync_ci95"][1]
    assert "| history |" in power_markdown(power) and "faster" in power_markdown(power)
    assert t975(4) == pytest.approx(2.776) and t975(100) == 2.0
    # variants: a label of its own, the base policy and its overrides in the recipe
    from rollout_accel.rollout.recipe import Recipe

    planned = plan_runs(Recipe(), ["sync", "history-tail"], [0], tmp_path, "disabled")
    tail = next(r for r in planned if run_label(r) == "history-tail")
    assert tail.rollout.policy == "history"
    assert tail.rollout.tail_budget == VARIANTS["history-tail"]["rollout.tail_budget"]
