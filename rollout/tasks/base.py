"""What a verifiable task is: seeded problems, a held-out split, an exact-match reward.

Every task writes its reference solution as `<scratchpad>#<answer>` and the answer after the first
'#' is what the reward checks. Train and eval problems are disjoint by construction: a problem's
split is a fixed function of its key (`split_of`), so no seed or size can make them overlap.
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

from rollout_accel.rollout.tasks.tokenizer import EOS, CharTokenizer

Split = Literal["train", "eval"]

# One key in EVAL_BUCKETS is held out for evaluation.
EVAL_BUCKETS = 8
# How many draws per requested problem before giving up on finding enough distinct ones.
_MAX_DRAWS_PER_PROBLEM = 50
ANSWER_MARK = "#"


@dataclass(frozen=True, slots=True)
class Problem:
    """One prompt with its reference answer and worked solution.

    `solution` is what a perfect response is (scratchpad, then `#answer`), without the eos token;
    `difficulty` is the task's own size measure (steps, list length); `key` identifies the prompt
    across steps (history, partial-rollout buffer) and equals the prompt text.
    """

    prompt: str
    answer: str
    solution: str
    difficulty: int
    key: str


def split_of(key: str) -> Split:
    """The split a problem key belongs to; stable across processes and Python versions."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return "eval" if int.from_bytes(digest, "little") % EVAL_BUCKETS == 0 else "train"


class Task(ABC):
    """A generator of verifiable problems plus their reward.

    Subclasses implement `name` and `_draw(rng)`; generation, the split, answer extraction,
    reward and SFT text are shared. Problems within one call are distinct (by key).
    """

    name: str

    def __init__(self) -> None:
        self.tokenizer = CharTokenizer()

    @abstractmethod
    def _draw(self, rng: random.Random) -> Problem:
        """One random problem (any split); must be a pure function of the rng state."""

    def train_prompts(self, n: int, seed: int = 0) -> list[Problem]:
        """`n` distinct training problems, reproducible from `seed`."""
        return self._generate(n, seed, "train")

    def eval_prompts(self, n: int, seed: int = 0) -> list[Problem]:
        """`n` distinct held-out problems, never among any `train_prompts` output."""
        return self._generate(n, seed, "eval")

    def _generate(self, n: int, seed: int, split: Split) -> list[Problem]:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{self.name}: number of problems must be an int >= 0, got {n!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{self.name}: seed must be an int, got {seed!r}")
        # A string seed is hashed with SHA-512 by `random`, so streams are stable across runs,
        # and train/eval streams differ even for the same integer seed.
        rng = random.Random(f"{self.name}:{split}:{seed}")
        problems: list[Problem] = []
        seen: set[str] = set()
        budget = _MAX_DRAWS_PER_PROBLEM * n + 1000
        for _ in range(budget):
            if len(problems) == n:
                break
            problem = self._draw(rng)
            if problem.key in seen or split_of(problem.key) != split:
                continue
            seen.add(problem.key)
            problems.append(problem)
        if len(problems) < n:
            raise ValueError(
                f"{self.name}: found only {len(problems)} distinct {split} problems of the {n} asked "
                f"for after {budget} draws; widen the task's ranges or ask for fewer"
            )
        return problems

    def extract_answer(self, response_text: str) -> str | None:
        """The answer a response gives: the text after its first '#', up to a newline or '<'.

        None when the response has no '#'.
        """
        _, mark, tail = response_text.partition(ANSWER_MARK)
        if not mark:
            return None
        for stop in ("\n", "<"):
            tail = tail.split(stop, 1)[0]
        return tail.strip()

    def reward(self, problem: Problem, response_text: str) -> float:
        """1.0 when the extracted answer equals the reference answer exactly, else 0.0."""
        return 1.0 if self.extract_answer(response_text) == problem.answer else 0.0

    def sft_example(self, problem: Problem) -> str:
        """Prompt, reference solution and `<eos>`: the text of one SFT warm-start example."""
        return f"{problem.prompt}{problem.solution}{EOS}"

    def encode_prompt(self, problem: Problem) -> list[int]:
        """Prompt ids as the model sees them (`<bos>` + prompt); the one place this is decided."""
        return self.tokenizer.encode(problem.prompt, add_bos=True)
