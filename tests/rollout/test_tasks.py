"""Toy tasks: tokenizer, seeded data, held-out split, scratchpad length, exact-match reward."""

from __future__ import annotations

import collections
import itertools
import statistics

import pytest

from rollout_accel.rollout.tasks import (
    TASKS,
    ArithmeticConfig,
    ArithmeticTask,
    CharTokenizer,
    SortingConfig,
    SortingTask,
    arithmetic,
    get_task,
    sorting,
    split_of,
)
from rollout_accel.rollout.tasks.tokenizer import CHARACTERS

# --- tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_round_trips_every_character_and_specials():
    tok = CharTokenizer()
    text = CHARACTERS + "12+7=19,19-5=14#14"
    assert tok.decode(tok.encode(text)) == text
    with_specials = "<bos>3+4=7#7<eos><pad>"
    ids = tok.encode(with_specials)
    assert ids[0] == tok.bos_id and ids[-2:] == [tok.eos_id, tok.pad_id]
    assert tok.decode(ids, skip_special_tokens=False) == with_specials
    assert tok.decode(ids) == "3+4=7#7"
    assert tok.vocab_size == len(CHARACTERS) + 3 == len(tok.vocab)
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3
    assert tok.encode("1", add_bos=True, add_eos=True) == [
        tok.bos_id,
        tok.encode("1")[0],
        tok.eos_id,
    ]


def test_tokenizer_ids_outside_vocab_decode_to_nothing():
    tok = CharTokenizer()
    one = tok.encode("1")[0]
    assert tok.decode([one, tok.vocab_size, tok.vocab_size + 100, -1, one]) == "11"


@pytest.mark.parametrize(
    "text, bad", [("3+4=7!", "'!'"), ("Abc", "'A'"), ("2<3", "'<'"), ("é", "'é'")]
)
def test_tokenizer_names_the_character_it_cannot_encode(text, bad):
    with pytest.raises(ValueError, match=bad):
        CharTokenizer().encode(text)


def test_tokenizer_rejects_non_strings():
    with pytest.raises(TypeError, match="expects str"):
        CharTokenizer().encode([1, 2])  # type: ignore[arg-type]


# --- arithmetic --------------------------------------------------------------------------------


def test_arithmetic_solution_written_out_by_hand():
    p = arithmetic.make_problem([12, 7, 5, 30], ["+", "-", "+"])
    assert p.prompt == "12+7-5+30="
    assert p.solution == "12+7=19,19-5=14,14+30=44#44"
    assert (p.answer, p.difficulty, p.key) == ("44", 3, "12+7-5+30=")
    negative = arithmetic.make_problem([3, 9], ["-"])
    assert (negative.solution, negative.answer) == ("3-9=-6#-6", "-6")


def test_arithmetic_answers_are_correct():
    task = ArithmeticTask(ArithmeticConfig(max_steps=8, max_operand=99))
    for p in task.train_prompts(300, seed=3):
        assert int(p.answer) == eval(p.prompt.rstrip("="))  # prompts are digits and +/- only
        assert p.solution.endswith("#" + p.answer)
        assert p.solution.count("=") == p.difficulty


@pytest.mark.parametrize("name", TASKS)
def test_data_is_seeded_and_reproducible(name):
    task = get_task(name)
    assert task.train_prompts(50, seed=7) == get_task(name).train_prompts(50, seed=7)
    assert task.eval_prompts(20, seed=7) == task.eval_prompts(20, seed=7)
    assert task.train_prompts(50, seed=7) != task.train_prompts(50, seed=8)


@pytest.mark.parametrize("name", TASKS)
def test_train_and_eval_are_disjoint_and_distinct(name):
    task = get_task(name)
    train = task.train_prompts(1500, seed=0)
    evals = task.eval_prompts(200, seed=0)
    train_keys, eval_keys = {p.key for p in train}, {p.key for p in evals}
    assert len(train_keys) == 1500 and len(eval_keys) == 200
    assert not train_keys & eval_keys
    # Disjoint by construction: any seed's train set avoids any seed's eval set.
    assert not {p.key for p in task.train_prompts(300, seed=99)} & eval_keys
    assert {split_of(k) for k in train_keys} == {"train"}
    assert {split_of(k) for k in eval_keys} == {"eval"}


@pytest.mark.parametrize("name", TASKS)
def test_scratchpad_length_grows_with_difficulty(name):
    task = get_task(name)
    by_difficulty = collections.defaultdict(list)
    for p in task.train_prompts(1500, seed=1):
        by_difficulty[p.difficulty].append(len(p.solution))
    means = [statistics.mean(by_difficulty[d]) for d in sorted(by_difficulty)]
    assert len(means) >= 4
    assert all(a < b for a, b in itertools.pairwise(means)), means


def test_difficulty_has_a_decaying_tail():
    task = ArithmeticTask(ArithmeticConfig(min_steps=1, max_steps=8, max_operand=999))
    counts = collections.Counter(p.difficulty for p in task.train_prompts(3000, seed=2))
    assert set(counts) <= set(range(1, 9))
    assert counts[1] > counts[2] > counts[4] > counts[8] > 0
    assert counts[1] > 5 * counts[8]


@pytest.mark.parametrize("name", TASKS)
def test_reward_is_exact_match_both_ways(name):
    task = get_task(name)
    for p in task.eval_prompts(30, seed=0):
        assert task.reward(p, p.solution) == 1.0
        assert task.reward(p, "#" + p.answer + "\nanything after") == 1.0
        assert task.reward(p, p.solution + "<eos>") == 1.0
        assert task.reward(p, p.solution + "0") == 0.0
        assert task.reward(p, p.solution[: -len(p.answer)] + "7" + p.answer) == 0.0
        assert task.reward(p, p.solution.replace("#", "")) == 0.0
        assert task.reward(p, "") == 0.0


def test_reward_hand_cases():
    task = ArithmeticTask()
    p = arithmetic.make_problem([12, 7], ["+"])
    assert task.reward(p, "12+7=19#19") == 1.0
    assert task.reward(p, "12+7=18#18") == 0.0
    assert task.reward(p, "12+7=19# 19 ") == 1.0
    assert task.reward(p, "12+7=19#-19") == 0.0
    assert task.extract_answer("no answer mark") is None


def test_sorting_solution_written_out_by_hand():
    p = sorting.make_problem([5, 3, 9, 1])
    assert p.prompt == "sort 5,3,9,1="
    assert p.solution == "1|5,3,9;3|5,9;5|9#1,3,5,9"
    assert (p.answer, p.difficulty) == ("1,3,5,9", 4)
    assert sorting.make_problem([5, 3, 9, 1], scratchpad=False).solution == "#1,3,5,9"
    task = SortingTask(SortingConfig(scratchpad=False))
    for q in task.train_prompts(100):
        values = [int(v) for v in q.prompt.removeprefix("sort ").rstrip("=").split(",")]
        assert q.answer == ",".join(map(str, sorted(values))) and q.solution == "#" + q.answer


@pytest.mark.parametrize("name", TASKS)
def test_sft_example_and_prompt_ids_encode(name):
    task = get_task(name)
    tok = task.tokenizer
    for p in task.train_prompts(20):
        text = task.sft_example(p)
        assert text == p.prompt + p.solution + "<eos>"
        ids = tok.encode(text)
        assert ids[-1] == tok.eos_id and tok.decode(ids) == p.prompt + p.solution
        assert task.encode_prompt(p) == [tok.bos_id, *tok.encode(p.prompt)]


# --- registry and bad inputs ------------------------------------------------------------------


def test_registry_builds_tasks_with_options():
    assert set(TASKS) == {"arithmetic", "sorting"}
    task = get_task("arithmetic", max_steps=3, max_operand=9)
    assert isinstance(task, ArithmeticTask) and task.config.max_steps == 3
    assert all(p.difficulty <= 3 for p in task.train_prompts(100))
    assert isinstance(get_task("sorting", scratchpad=False), SortingTask)


def test_registry_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match="valid tasks: arithmetic, sorting"):
        get_task("countdown")
    with pytest.raises(ValueError, match=r"no option 'max_len'.*valid options: min_steps"):
        get_task("arithmetic", max_len=3)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ArithmeticConfig(min_steps=4, max_steps=2),
        lambda: ArithmeticConfig(min_steps=0),
        lambda: ArithmeticConfig(tail_alpha=-1.0),
        lambda: ArithmeticConfig(max_operand=0),
        lambda: ArithmeticConfig(operators="+*"),
        lambda: SortingConfig(min_len=1),
        lambda: SortingConfig(max_value=0),
    ],
)
def test_bad_configs_raise(make):
    with pytest.raises(ValueError):
        make()


def test_bad_generation_requests_raise():
    task = ArithmeticTask()
    with pytest.raises(ValueError, match=">= 0"):
        task.train_prompts(-1)
    with pytest.raises(ValueError, match="seed must be an int"):
        task.train_prompts(3, seed="x")  # type: ignore[arg-type]
    tiny = SortingTask(SortingConfig(min_len=2, max_len=2, max_value=1))
    with pytest.raises(ValueError, match="found only"):
        tiny.train_prompts(10)
    with pytest.raises(ValueError, match="k >= 1 operators"):
        arithmetic.make_problem([1, 2, 3], ["+"])
    with pytest.raises(ValueError, match="at least 2 values"):
        sorting.make_problem([1])
