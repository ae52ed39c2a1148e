"""A seeded synthetic RL rollout trace shaped after published measurements (WORKLOADS.md).

`SyntheticLongtailTrace` gives, for any (prompt, step), a group's response lengths, rewards and
truncation flags, and each response's token ids; every draw is a pure function of
(seed, prompt, step, sample), so two policies replaying the trace see the same world, and a
group of n samples is the first n of the (prompt, step)'s draws.

Who uses it: the sampler evaluation (`python -m rollout_accel.sampling.evaluation`) and the
controller benchmark (`rollout bench`): the engine generates each response with
max_new_tokens = its length and ignore_eos, and the reward is drawn at completion.

Model (all parameters below are fixed module constants with their sources; never tuned to make
a policy look good):

Lengths, on the log scale, at the reference cap of 16,384 tokens:
    log L = log(1160) + a_i + c_t + u_it + delta * (wrong - E[wrong]) + e_itj
  - median 1,160 and p90/p50 = 3.5 (TailSieve, Qwen3 math, 16k cap) set the total log-std
    sigma = ln(3.5) / z_0.9 = 0.978;
  - that variance splits as TailSieve measured: prompt a_i 64.8%, within-group e 26.1%,
    checkpoint c_t 2.2% (a linear rise over training: mean length grows, DeepSeek-R1-Zero /
    Kimi k1.5), prompt x checkpoint u 6.9% (so a prompt's length rank is stable, not fixed);
  - wrong answers run longer (DeepScaleR: ~3x on average, which mixes prompt difficulty and the
    within-prompt effect): a_i correlates 0.5 with prompt difficulty, and within a group a
    wrong answer is 2x a right one (delta = ln 2, taken out of the within-group share);
  - ~3% of responses are truncated at the cap (TailSieve): the lognormal tail gives ~0.3%; the
    rest are runaway responses (repetition loops) that run to the cap, more likely on prompts
    with long responses; a truncated response gets reward 0.
  `max_len` rescales all lengths proportionally (cap = max_len, median = 1160 * max_len/16384),
  so a CPU benchmark can run the same shape with max_len=256.

Rewards: binary; each prompt has a latent pass rate p_it = sigmoid(theta_i + g_i * min(t/H, 1))
that drifts upward over the horizon H = `horizon_steps`. theta ~ N(-1, 8^2) (a U-shaped pass-rate
distribution: many prompts are never or always solved), g ~ N(4, 1) clipped at 0. Chosen, with
n = 16, to land on the published zero-variance figures: ~60% of each batch zero-variance
(RL-ZVP: 30-99%; Knapsack RL: effective share usually < 60%), mostly all-wrong early and mostly
all-right late (RL-ZVP), and ~80% of zero-variance prompts zero-variance again one epoch later
(GRESO). Wrong answers are only ~1.9x longer than right ones overall here (DeepScaleR: ~3x): a
conservative choice, since skipping long all-wrong groups is where skipping saves most tokens.
`trace_statistics` measures all of these; the evaluation prints them.

Tokens: each prompt has a reference solution made of 32-token blocks; each block is redrawn
(the policy's wording drifts) on average once per 2H steps. A response alternates segments
(geometric, mean 12 tokens) copied from the reference with probability 0.8 and freshly sampled
otherwise; a fresh segment replaces a reference span of a different length, shifting alignment.
Measured (`trace_statistics`): ~60% of a response's 3-grams occur in the previous epoch's group
(SPEC-RL: 50-70% of content overlaps between rounds), ~67% in 8 of its siblings'.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

from .errors import InvalidArgumentError, InvalidConfigError

# --- published shape (sources in the module docstring) -------------------------------------------
REFERENCE_CAP = 16_384
MEDIAN_LENGTH = 1_160
P90_OVER_P50 = 3.5
TRUNCATED_SHARE = 0.03
SHARE_PROMPT, SHARE_WITHIN, SHARE_CHECKPOINT, SHARE_INTERACTION = 0.648, 0.261, 0.022, 0.069
CONTENT_OVERLAP = 0.6  # SPEC-RL: 50-70% of content overlaps between rounds

# --- derived and assumed constants ---------------------------------------------------------------
LOG_STD = math.log(P90_OVER_P50) / 1.2815515655446004  # z of the 0.9 quantile
WRONG_LOG_SHIFT = math.log(2.0)  # within-group: a wrong answer is 2x a right one
DIFFICULTY_LENGTH_CORR = 0.5  # harder prompts run longer
PROMPT_MEDIAN, PROMPT_LOG_STD, PROMPT_LENGTH_CORR = 120.0, 0.6, 0.3  # assumption, no source
THETA_MEAN, THETA_STD, GAIN_MEAN, GAIN_STD = -1.0, 8.0, 4.0, 1.0
# Token model, set so the measured 3-gram overlap with the previous epoch is ~CONTENT_OVERLAP.
BLOCK, SEGMENT_MEAN, COPY_PROB, REDRAWS_PER_2H = 32, 12.0, 0.8, 1.0
_TAIL_SHARE = 0.5 * math.erfc(
    (math.log(REFERENCE_CAP) - math.log(MEDIAN_LENGTH)) / (LOG_STD * math.sqrt(2.0))
)
RUNAWAY_SHARE = TRUNCATED_SHARE - _TAIL_SHARE  # runaways fill the gap to the published 3%
_VOCAB_LOW = 16  # ids below this are left to special tokens


@dataclass(frozen=True, slots=True)
class TraceConfig:
    """Size and seed of a trace; the shape constants are module-level and fixed."""

    num_prompts: int = 4096
    n_per_prompt: int = 16
    max_len: int = REFERENCE_CAP
    seed: int = 0
    horizon_steps: int = 96
    vocab_size: int = 32_000
    max_group_size: int = 64

    def __post_init__(self) -> None:
        if self.num_prompts < 1 or self.n_per_prompt < 1 or self.horizon_steps < 1:
            raise InvalidConfigError("TraceConfig: num_prompts, n_per_prompt, horizon_steps >= 1")
        if not 1 <= self.n_per_prompt <= self.max_group_size:
            raise InvalidConfigError("TraceConfig: n_per_prompt must be <= max_group_size")
        if self.max_len < 8:
            raise InvalidConfigError(f"TraceConfig.max_len={self.max_len} must be >= 8")
        if self.vocab_size <= _VOCAB_LOW + 1:
            raise InvalidConfigError(f"TraceConfig.vocab_size must be > {_VOCAB_LOW + 1}")


@dataclass(frozen=True, slots=True)
class TraceGroup:
    """One group's outcome: lengths (tokens, <= max_len), rewards (0/1), truncated (at cap)."""

    prompt: int
    step: int
    lengths: np.ndarray
    rewards: np.ndarray
    truncated: np.ndarray

    @property
    def zero_variance(self) -> bool:
        return bool(self.rewards.min() == self.rewards.max())

    @property
    def finish_reasons(self) -> list[str]:
        return ["length" if t else "stop" for t in self.truncated]


class SyntheticLongtailTrace:
    """The seeded trace described in the module docstring."""

    def __init__(
        self,
        num_prompts: int = 4096,
        n_per_prompt: int = 16,
        max_len: int = REFERENCE_CAP,
        seed: int = 0,
        *,
        horizon_steps: int = 96,
        vocab_size: int = 32_000,
        max_group_size: int = 64,
    ) -> None:
        self.config = TraceConfig(
            num_prompts, n_per_prompt, max_len, seed, horizon_steps, vocab_size, max_group_size
        )
        rng = np.random.default_rng([seed, 0x7A11])
        k = num_prompts
        self.theta = rng.normal(THETA_MEAN, THETA_STD, k)
        self.gain = np.maximum(rng.normal(GAIN_MEAN, GAIN_STD, k), 0.0)
        hardness = -(self.theta - THETA_MEAN) / THETA_STD
        z = DIFFICULTY_LENGTH_CORR * hardness + math.sqrt(
            1 - DIFFICULTY_LENGTH_CORR**2
        ) * rng.normal(size=k)
        self.prompt_effect = math.sqrt(SHARE_PROMPT) * LOG_STD * z
        # Runaway propensity rises with the prompt's length effect; mean RUNAWAY_SHARE.
        weight = np.exp(z)
        self.runaway = np.minimum(RUNAWAY_SHARE * weight / weight.mean(), 0.5)
        scale = max_len / REFERENCE_CAP
        zp = PROMPT_LENGTH_CORR * z + math.sqrt(1 - PROMPT_LENGTH_CORR**2) * rng.normal(size=k)
        raw = np.exp(math.log(PROMPT_MEDIAN) + PROMPT_LOG_STD * zp) * max(scale, 1 / 16)
        self.prompt_lengths = np.maximum(np.round(raw), 4).astype(np.int64)
        self.block_phase = rng.random((k, 1 + REFERENCE_CAP // BLOCK))
        self._log_median = math.log(MEDIAN_LENGTH * scale)
        # The wrong-answer shift is part of the within-group share: the residual gets the rest.
        grid = np.linspace(0.0, 1.0, 11)[None, :]
        p = 1.0 / (1.0 + np.exp(-(self.theta[:, None] + self.gain[:, None] * grid)))
        pq = float((p * (1.0 - p)).mean())
        self._within_resid = math.sqrt(
            max(SHARE_WITHIN * LOG_STD**2 - WRONG_LOG_SHIFT**2 * pq, 0.01)
        )

    # --- latent state ---------------------------------------------------------------------------

    def progress(self, step: int) -> float:
        """Training progress in [0, 1]: step / horizon_steps, saturating."""
        return min(max(step, 0) / self.config.horizon_steps, 1.0)

    def pass_rate(self, prompt: int, step: int) -> float:
        """The latent chance one response to `prompt` is correct at `step` (before truncation)."""
        self._check(prompt)
        x = self.theta[prompt] + self.gain[prompt] * self.progress(step)
        return float(1.0 / (1.0 + math.exp(-x)))

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The data source's seeded shuffle of all prompt indices for `epoch`."""
        return np.random.default_rng([self.config.seed, epoch, 0xE90C]).permutation(
            self.config.num_prompts
        )

    # --- draws ------------------------------------------------------------------------------------

    def draw_group(self, prompt: int, step: int, n: int | None = None) -> TraceGroup:
        """The group of `n` (default n_per_prompt) responses to `prompt` at `step`."""
        self._check(prompt)
        cfg = self.config
        n = cfg.n_per_prompt if n is None else n
        if not 1 <= n <= cfg.max_group_size:
            raise InvalidArgumentError(f"draw_group: n={n} must be in [1, {cfg.max_group_size}]")
        m = cfg.max_group_size
        rng = np.random.default_rng([cfg.seed, prompt, step, 0x6A0])
        p = self.pass_rate(prompt, step)
        progress = self.progress(step)
        checkpoint = math.sqrt(SHARE_CHECKPOINT * 12.0) * LOG_STD * (progress - 0.5)
        interaction = math.sqrt(SHARE_INTERACTION) * LOG_STD * rng.normal()
        correct = rng.random(m) < p
        runaway = rng.random(m) < self.runaway[prompt]
        noise = rng.normal(0.0, self._within_resid, m)
        log_len = (
            self._log_median
            + self.prompt_effect[prompt]
            + checkpoint
            + interaction
            + WRONG_LOG_SHIFT * ((~correct) - (1.0 - p))
            + noise
        )
        lengths = np.exp(log_len)[:n]
        truncated = (lengths >= cfg.max_len) | runaway[:n]
        lengths = np.where(truncated, cfg.max_len, np.maximum(np.round(lengths), 1))
        rewards = (correct[:n] & ~truncated).astype(np.float64)
        return TraceGroup(prompt, step, lengths.astype(np.int64), rewards, truncated)

    def prompt_tokens(self, prompt: int) -> np.ndarray:
        """Token ids of the prompt (length `prompt_lengths[prompt]`)."""
        self._check(prompt)
        rng = np.random.default_rng([self.config.seed, prompt, 0x9807])
        return rng.integers(_VOCAB_LOW, self.config.vocab_size, int(self.prompt_lengths[prompt]))

    def response_tokens(
        self, prompt: int, step: int, sample: int, length: int | None = None
    ) -> np.ndarray:
        """Token ids of response `sample` of the group at (prompt, step), `length` tokens long
        (default: the length `draw_group` gives that sample)."""
        self._check(prompt)
        cfg = self.config
        if length is None:
            length = int(self.draw_group(prompt, step, sample + 1).lengths[sample])
        rng = np.random.default_rng([cfg.seed, prompt, step, sample, 0x70C])
        out = np.empty(length, dtype=np.int64)
        pos = 0  # output position
        cursor = 0  # position in the reference solution
        while pos < length:
            seg = min(int(rng.geometric(1.0 / SEGMENT_MEAN)), length - pos)
            if rng.random() < COPY_PROB:
                out[pos : pos + seg] = self._reference(prompt, step, cursor, seg)
                cursor += seg
            else:
                out[pos : pos + seg] = rng.integers(_VOCAB_LOW, cfg.vocab_size, seg)
                # A rewritten passage replaces a reference span of a different length.
                cursor += int(rng.geometric(1.0 / seg))
            pos += seg
        return out

    def _reference(self, prompt: int, step: int, start: int, count: int) -> np.ndarray:
        rate = REDRAWS_PER_2H / (2.0 * self.config.horizon_steps)
        parts = []
        at = start
        while at < start + count:
            b = at // BLOCK
            phase = self.block_phase[prompt, b % self.block_phase.shape[1]]
            version = int(step * rate + phase)
            block = _block(self.config.seed, self.config.vocab_size, prompt, b, version)
            take = min(start + count, (b + 1) * BLOCK) - at
            parts.append(block[at - b * BLOCK : at - b * BLOCK + take])
            at += take
        return np.concatenate(parts)

    def _check(self, prompt: int) -> None:
        if not 0 <= prompt < self.config.num_prompts:
            raise InvalidArgumentError(
                f"prompt {prompt} out of range [0, {self.config.num_prompts})"
            )

    def describe(self) -> dict[str, object]:
        """Every parameter of the trace (config and fixed constants), for printing."""
        return {
            **asdict(self.config),
            "reference_cap": REFERENCE_CAP,
            "median_length_at_reference_cap": MEDIAN_LENGTH,
            "p90_over_p50": P90_OVER_P50,
            "truncated_share": TRUNCATED_SHARE,
            "log_std": round(LOG_STD, 4),
            "variance_shares": {
                "prompt": SHARE_PROMPT,
                "within_group": SHARE_WITHIN,
                "checkpoint": SHARE_CHECKPOINT,
                "interaction": SHARE_INTERACTION,
            },
            "wrong_over_right_within_group": 2.0,
            "difficulty_length_corr": DIFFICULTY_LENGTH_CORR,
            "pass_logit": {
                "theta_mean": THETA_MEAN,
                "theta_std": THETA_STD,
                "gain_mean": GAIN_MEAN,
                "gain_std": GAIN_STD,
            },
            "content_overlap_target": CONTENT_OVERLAP,
            "token_model": {
                "block": BLOCK,
                "segment_mean": SEGMENT_MEAN,
                "copy_prob": COPY_PROB,
                "redraws_per_2h": REDRAWS_PER_2H,
            },
            "prompt_length": {
                "median": PROMPT_MEDIAN,
                "log_std": PROMPT_LOG_STD,
                "corr_with_length": PROMPT_LENGTH_CORR,
            },
        }


@lru_cache(maxsize=65_536)
def _block(seed: int, vocab: int, prompt: int, block: int, version: int) -> np.ndarray:
    rng = np.random.default_rng([seed, prompt, block, version, 0xB10C])
    return rng.integers(_VOCAB_LOW, vocab, BLOCK)


def trace_statistics(
    trace: SyntheticLongtailTrace, steps: list[int], prompts: int = 1024, overlap_prompts: int = 8
) -> dict[str, float]:
    """Measure the trace's shape on `prompts` prompts at `steps`, to compare with WORKLOADS.md.

    Reports length median, p90/p50, truncated share (at the reference-cap scale these match
    TailSieve's figures), the share of log-length variance explained by the prompt, the
    within-group wrong/right length ratio and across-prompt one, the zero-variance share at the
    first and last step, and persistence: the share of zero-variance groups at steps[i] whose
    prompt is zero-variance again at steps[i+1]; and content overlap: the share of a response's
    3-grams found in the group of the same prompt at steps[0] (epoch overlap, responses at
    steps[1]) and in its siblings at steps[0] (another 8 samples of the same group).
    """
    k = min(prompts, trace.config.num_prompts)
    groups = [[trace.draw_group(i, t) for i in range(k)] for t in steps]
    lengths = np.concatenate([g.lengths for row in groups for g in row]).astype(np.float64)
    trunc = np.concatenate([g.truncated for row in groups for g in row])
    rewards = np.concatenate([g.rewards for row in groups for g in row])
    logs = np.log(lengths[~trunc])
    prompt_means = np.array(
        [
            np.mean([np.log(row[i].lengths[~row[i].truncated]).mean() for row in groups])
            for i in range(k)
            if all((~row[i].truncated).any() for row in groups)
        ]
    )
    zero = np.array([[g.zero_variance for g in row] for row in groups])
    stay = [zero[s + 1][zero[s]].mean() for s in range(len(steps) - 1) if zero[s].any()] or [
        float("nan")
    ]
    ok = ~trunc
    median = float(np.median(lengths))
    return {
        "median_length": median,
        "p90_over_p50": float(np.quantile(lengths, 0.9) / median),
        "max_over_median": float(lengths.max() / median),
        "truncated_share": float(trunc.mean()),
        "prompt_variance_share": float(prompt_means.var() / logs.var()),
        "wrong_over_right_mean_length": float(
            lengths[ok & (rewards == 0)].mean() / lengths[ok & (rewards == 1)].mean()
        ),
        "zero_variance_share_first": float(zero[0].mean()),
        "zero_variance_share_last": float(zero[-1].mean()),
        "all_wrong_share_first": float(
            np.mean([g.zero_variance and g.rewards[0] == 0 for g in groups[0]])
        ),
        "all_right_share_last": float(
            np.mean([g.zero_variance and g.rewards[0] == 1 for g in groups[-1]])
        ),
        "zero_variance_persistence": float(np.mean(stay)),
        **_overlap(trace, steps, min(overlap_prompts, k)),
    }


def _overlap(trace: SyntheticLongtailTrace, steps: list[int], prompts: int) -> dict[str, float]:
    if len(steps) < 2 or prompts < 1:
        return {}
    n = min(8, trace.config.max_group_size // 2)
    found = {"epoch": [0, 0], "siblings": [0, 0]}
    for p in range(prompts):
        seen: set[tuple[int, ...]] = set()
        first = trace.draw_group(p, steps[0], 2 * n)
        for j in range(n):
            r = trace.response_tokens(p, steps[0], j, int(first.lengths[j])).tolist()
            seen.update(zip(r[:-2], r[1:-1], r[2:], strict=False))
        later = trace.draw_group(p, steps[1], n)
        for kind, step, group, offset in (
            ("epoch", steps[1], later, 0),
            ("siblings", steps[0], first, n),
        ):
            for j in range(n):
                r = trace.response_tokens(p, step, j + offset, int(group.lengths[j + offset]))
                grams = list(zip(r[:-2].tolist(), r[1:-1].tolist(), r[2:].tolist(), strict=True))
                found[kind][0] += sum(g in seen for g in grams)
                found[kind][1] += len(grams)
    return {f"{kind}_3gram_overlap": a / max(b, 1) for kind, (a, b) in found.items()}
