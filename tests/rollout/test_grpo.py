"""Trainer math: advantages, PPO-clip loss, masks, response logprobs, SFT, GRPO steps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM

from rollout_accel.rollout.tasks import get_task
from rollout_accel.rollout.tasks.tokenizer import CharTokenizer
from rollout_accel.rollout.trainer import (
    GRPOConfig,
    GRPOTrainer,
    SFTConfig,
    TrainSample,
    build_sft_examples,
    group_advantages,
    pack_batch,
    policy_loss,
    response_logprobs,
    sft_train,
)

VOCAB = CharTokenizer().vocab_size


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy 2-core box two threads ran 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TinyQwen3(nn.Module):
    """Stand-in for the project's Qwen3: `model(input_ids) -> logits`."""

    def __init__(self, seed: int = 0, vocab: int = VOCAB) -> None:
        super().__init__()
        torch.manual_seed(seed)
        config = Qwen3Config(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=512,
            tie_word_embeddings=True,
        )
        self.lm = Qwen3ForCausalLM(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


class UnigramLM(nn.Module):
    """Logits that ignore the input ids, so no embedding lookup can catch a bad id."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(vocab))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(*input_ids.shape, -1)


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --- advantages --------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    # Group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.577350 -> +-0.5 / 0.577350.
    # Group 1: all equal -> exactly 0.
    # Group 2: mean 0.25, deviations -0.25 x3, 0.75; var (3 * 0.0625 + 0.5625) / 3 = 0.25, std 0.5.
    expected = torch.tensor(
        [
            [0.866025, -0.866025, -0.866025, 0.866025],
            [0.0, 0.0, 0.0, 0.0],
            [-0.5, -0.5, -0.5, 1.5],
        ]
    )
    adv = group_advantages(rewards)
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)
    assert (adv[1] == 0).all()
    centred = group_advantages(rewards, normalize_std=False)
    torch.testing.assert_close(centred[2], torch.tensor([-0.25, -0.25, -0.25, 0.75]))
    assert (group_advantages(torch.tensor([[0.3], [1.0]])) == 0).all()
    assert (group_advantages(torch.full((2, 3), 0.1)) == 0).all()


@pytest.mark.parametrize(
    "rewards, match",
    [
        (torch.zeros(4), r"\[groups, n\]"),
        (torch.zeros(2, 0), "at least one"),
        (torch.tensor([[0.0, float("nan")]]), "finite"),
    ],
)
def test_group_advantages_bad_inputs(rewards, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards)


# --- policy loss -------------------------------------------------------------------------------


def test_policy_loss_by_hand():
    old = torch.tensor([[-1.0, -2.0, -3.0]])
    new = old + torch.tensor([[0.0, 0.1, 0.5]])
    adv = torch.tensor([[0.5, -1.0, 1.0]])
    # token 0: ratio 1, -1 * 0.5 = -0.5
    # token 1: ratio e^0.1 = 1.105171 inside [0.8, 1.28], A=-1 -> +1.105171
    # token 2: ratio e^0.5 = 1.648721 > 1.28, A=+1 -> clipped to -1.28
    loss, metrics = policy_loss(new, old, adv, torch.ones(1, 3))
    assert loss.item() == pytest.approx((-0.5 + 1.105171 - 1.28) / 3, abs=1e-6)
    assert metrics["pg_clipfrac"] == pytest.approx(1 / 3)
    assert metrics["ppo_kl"] == pytest.approx(-(0.0 + 0.1 + 0.5) / 3)
    assert metrics["loss"] == pytest.approx(metrics["pg_loss"])


def test_policy_loss_is_a_token_level_mean_over_the_batch():
    # One 1-token response (A=+1) and one 3-token response (A=-1), on-policy (ratio 1).
    lp = torch.zeros(2, 3)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -1.0])  # one per sequence, broadcast over tokens
    loss, _ = policy_loss(lp, lp, adv, mask)
    # token mean: (-1 + 3 * 1) / 4 = 0.5; a per-sample mean would have given (-1 + 1) / 2 = 0.
    assert loss.item() == pytest.approx(0.5)
    # With the batch's token count as normaliser, micro-batch losses add up to the batch loss.
    first, _ = policy_loss(lp[:1], lp[:1], adv[:1], mask[:1], normalizer=4.0)
    second, _ = policy_loss(lp[1:], lp[1:], adv[1:], mask[1:], normalizer=4.0)
    assert (first + second).item() == pytest.approx(loss.item())


def test_masked_tokens_get_exactly_zero_gradient():
    lp = torch.tensor([[-1.0, -2.0, -0.5, -0.7]], requires_grad=True)
    # Garbage in the masked slots must not leak: inf/nan old logprobs and advantages.
    old = torch.tensor([[-1.2, float("inf"), -0.4, float("nan")]])
    adv = torch.tensor([[1.0, float("nan"), -1.0, 2.0]])
    mask = torch.tensor([[1, 0, 1, 0]])
    loss, metrics = policy_loss(lp, old, adv, mask, kl_coef=0.1, ref_logprobs=old.clone())
    loss.backward()
    assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in metrics.values())
    assert lp.grad[0, 1] == 0 and lp.grad[0, 3] == 0
    assert lp.grad[0, 0] != 0 and lp.grad[0, 2] != 0


@pytest.mark.parametrize(
    "log_ratio, advantage, zero_grad",
    [
        (math.log(1.5), 1.0, True),  # above 1 + clip_high, pushing further up: clipped
        (math.log(1.1), 1.0, False),  # inside the range
        (math.log(0.5), 1.0, False),  # below the range but A > 0: PPO keeps the gradient
        (math.log(0.5), -1.0, True),  # below 1 - clip_low, pushing further down: clipped
        (math.log(1.5), -1.0, False),  # above the range but A < 0: gradient kept
        (math.log(1.25), 1.0, False),  # inside thanks to clip-higher (0.28)
    ],
)
def test_clip_zeroes_the_gradient_outside_the_trust_region(log_ratio, advantage, zero_grad):
    old = torch.tensor([[-1.0]])
    lp = (old + log_ratio).requires_grad_(True)
    loss, metrics = policy_loss(lp, old, torch.tensor([[advantage]]), torch.ones(1, 1))
    loss.backward()
    assert (lp.grad.abs().item() == 0.0) is zero_grad
    assert metrics["pg_clipfrac"] == (1.0 if zero_grad else 0.0)


def test_k3_kl_and_entropy_terms():
    lp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-0.5, -2.0]])
    ent = torch.tensor([[1.0, 3.0]])
    loss, metrics = policy_loss(
        lp, lp, torch.zeros(1, 2), torch.ones(1, 2), 0.2, 0.28, 0.5, ref, ent, 0.1
    )
    # k3 of token 0: exp(0.5) - 1 - 0.5 = 0.148721; token 1: 0 -> mean 0.074361.
    assert metrics["kl_loss"] == pytest.approx(0.0743606, abs=1e-6)
    assert metrics["entropy_loss"] == pytest.approx(2.0)
    assert loss.item() == pytest.approx(0.5 * 0.0743606 - 0.1 * 2.0, abs=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"old_logprobs": torch.zeros(2, 4)}, "old_logprobs has shape"),
        ({"clip_low": 1.0}, "clip_low"),
        ({"clip_high": -0.1}, "clip_high"),
        ({"kl_coef": 0.1}, "needs ref_logprobs"),
        ({"entropy_coef": 0.1}, "needs entropy"),
        ({"normalizer": 0.0}, "normalizer"),
    ],
)
def test_policy_loss_bad_inputs(kwargs, match):
    args = {
        "logprobs": torch.zeros(2, 3),
        "old_logprobs": torch.zeros(2, 3),
        "advantages": torch.zeros(2, 3),
        "loss_mask": torch.ones(2, 3),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        policy_loss(**args)


# --- response logprobs -------------------------------------------------------------------------


def test_padded_batch_logprobs_match_each_sequence_alone():
    model = TinyQwen3().eval()
    prompts = [[1, 5, 6, 7], [1, 8], [1, 9, 10, 11, 12, 13]]
    responses = [[14, 15, 2], [16, 17, 18, 19, 20, 2], [21]]
    batch = pack_batch(prompts, responses, pad_id=0)
    assert batch.input_ids.shape == (3, 8) and batch.response_ids.shape == (3, 6)
    with torch.no_grad():
        lp, ent = response_logprobs(model, batch, temperature=0.7, with_entropy=True)
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            logits = model(torch.tensor([p + r]))[0] / 0.7
            logp = torch.log_softmax(logits, -1)
            want = torch.stack([logp[len(p) - 1 + j, tok] for j, tok in enumerate(r)])
            torch.testing.assert_close(lp[i, : len(r)], want, atol=1e-5, rtol=1e-5)
            want_ent = -(logp.exp() * logp).sum(-1)[len(p) - 1 : len(p) - 1 + len(r)]
            torch.testing.assert_close(ent[i, : len(r)], want_ent, atol=1e-5, rtol=1e-5)
            assert (lp[i, len(r) :] == 0).all() and (ent[i, len(r) :] == 0).all()
    assert batch.response_mask.sum(1).tolist() == [3, 6, 1]


def test_response_logprobs_bad_inputs():
    model = TinyQwen3(vocab=16)
    with pytest.raises(ValueError, match="at least one token"):
        pack_batch([[]], [[1]])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        pack_batch([[1], [1]], [[2]])
    with pytest.raises(ValueError, match="empty batch"):
        pack_batch([], [])
    with pytest.raises(ValueError, match=r"largest token id 40.*outside the model's vocabulary"):
        response_logprobs(model, pack_batch([[1]], [[40]]))
    with pytest.raises(ValueError, match="outside the model's vocabulary of 8"):
        response_logprobs(UnigramLM(vocab=8), pack_batch([[1]], [[2, 70]]))
    with pytest.raises(ValueError, match="temperature"):
        response_logprobs(model, pack_batch([[1]], [[2]]), temperature=0.0)
    with pytest.raises(TypeError, match=r"logits \[B, T, V\]"):
        response_logprobs(nn.Identity(), pack_batch([[1]], [[2]]))  # returns the ids themselves


# --- SFT ---------------------------------------------------------------------------------------


def test_sft_on_arithmetic_lowers_the_loss():
    task = get_task("arithmetic", max_steps=3, max_operand=9)
    examples = build_sft_examples(task, task.train_prompts(256, seed=0))
    ex = examples[0]
    assert ex.prompt_ids[0] == task.tokenizer.bos_id and ex.target_ids[-1] == task.tokenizer.eos_id
    model = TinyQwen3()
    losses = sft_train(model, examples, SFTConfig(steps=40, batch_size=16, lr=3e-3))
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > math.log(VOCAB) * 0.8  # starts near uniform
    assert last < 0.75 * first, (first, last)  # seeds 0-2 reach 0.55-0.62


def test_sft_bad_inputs():
    with pytest.raises(ValueError, match="no examples"):
        sft_train(TinyQwen3(), [])
    with pytest.raises(ValueError, match="steps"):
        SFTConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        SFTConfig(lr=-1.0)


# --- GRPO trainer ------------------------------------------------------------------------------


def make_sample(model: nn.Module, prompt: list[int], response: list[int], reward: float, mask=None):
    with torch.no_grad():
        lp, _ = response_logprobs(model, pack_batch([prompt], [response]))
    return TrainSample(prompt, response, lp[0, : len(response)].tolist(), reward, mask or [])


def make_batch(model: nn.Module) -> list[list[TrainSample]]:
    g = torch.Generator().manual_seed(1)
    groups = []
    for rewards in ([1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]):
        prompt = [1, *torch.randint(3, VOCAB, (5,), generator=g).tolist()]
        group = []
        for r in rewards:
            n = int(torch.randint(1, 12, (1,), generator=g))
            group.append(
                make_sample(model, prompt, torch.randint(3, VOCAB, (n,), generator=g).tolist(), r)
            )
        groups.append(group)
    return groups


def test_gradient_does_not_depend_on_micro_batching_or_skipping():
    model = TinyQwen3()
    batch = make_batch(model)
    reference = None
    for tokens, skip in ((1, True), (10_000, True), (10_000, False), (40, False)):
        model.zero_grad(set_to_none=True)
        trainer = GRPOTrainer(
            model, GRPOConfig(micro_batch_tokens=tokens, skip_zero_advantage=skip)
        )
        metrics = trainer.backward(batch)
        grads = grads_of(model)
        if reference is None:
            reference, ref_metrics = grads, metrics
            assert metrics["forwarded_samples"] == 8.0  # the all-correct group is skipped
            assert metrics["zero_std_group_fraction"] == pytest.approx(1 / 3)
            continue
        assert grads.keys() == reference.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], reference[name], atol=1e-6, rtol=1e-4)
        assert metrics["loss"] == pytest.approx(ref_metrics["loss"], abs=1e-6)


def test_loss_masked_tokens_do_not_reach_the_model_gradient():
    model = TinyQwen3()
    prompt, response = [1, 5, 6, 7], [8, 9, 10, 11, 12, 13]
    mask = [0, 0, 1, 1, 1, 1]  # first two tokens came from an older policy (partial rollout)

    def grads_for(rollout_logprobs: list[float], loss_mask: list[int]) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        group = [
            TrainSample(prompt, response, rollout_logprobs, 1.0, loss_mask),
            make_sample(model, prompt, [14, 15, 2], 0.0),
        ]
        GRPOTrainer(model).backward([group])
        return grads_of(model)

    base = make_sample(model, prompt, response, 1.0).rollout_logprobs
    garbage = [-50.0, 3.0, *base[2:]]
    masked, masked_garbage = grads_for(base, mask), grads_for(garbage, mask)
    for name in masked:
        torch.testing.assert_close(masked[name], masked_garbage[name], atol=0, rtol=0)
    # Sanity: unmasked, the same garbage does change the gradient.
    unmasked, unmasked_garbage = grads_for(base, [1] * 6), grads_for(garbage, [1] * 6)
    assert any(not torch.equal(unmasked[n], unmasked_garbage[n]) for n in unmasked)


def test_train_steps_move_probability_towards_the_rewarded_response():
    model = TinyQwen3()
    prompt, good, bad = [1, 5, 6, 7], [20, 21, 22, 2], [30, 31, 32, 2]
    trainer = GRPOTrainer(model, GRPOConfig(lr=1e-3))

    def logprob(response: list[int]) -> float:
        with torch.no_grad():
            return response_logprobs(model, pack_batch([prompt], [response]))[0].sum().item()

    before = logprob(good) - logprob(bad)
    for _ in range(5):
        group = [make_sample(model, prompt, good, 1.0), make_sample(model, prompt, bad, 0.0)]
        metrics = trainer.train_step([group])
    assert logprob(good) - logprob(bad) > before + 1.0
    assert metrics["grad_norm"] > 0 and metrics["reward_mean"] == 0.5
    assert metrics["pg_clipfrac"] == 0.0  # rollout logprobs are current: ratio is exactly 1


def test_kl_term_uses_a_frozen_reference():
    model = TinyQwen3()
    trainer = GRPOTrainer(model, GRPOConfig(lr=1e-3, kl_coef=0.1))
    batch = make_batch(model)
    first = trainer.train_step(batch)
    assert first["kl_loss"] == pytest.approx(0.0, abs=1e-7)  # policy still equals the reference
    second = trainer.train_step(make_batch(model))
    assert second["kl_loss"] > 0
    assert all(not p.requires_grad for p in trainer.ref_model.parameters())


def test_trainer_bad_inputs():
    model = TinyQwen3()
    trainer = GRPOTrainer(model)
    sample = make_sample(model, [1, 5], [6, 7], 1.0)
    with pytest.raises(ValueError, match="empty batch"):
        trainer.train_step([])
    with pytest.raises(ValueError, match="non-empty list"):
        trainer.train_step([[]])
    with pytest.raises(ValueError, match="non-empty list"):
        trainer.train_step([sample])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="2 rollout_logprobs for 3"):
        TrainSample([1], [2, 3, 4], [-1.0, -1.0], 1.0)
    with pytest.raises(ValueError, match="loss_mask has 1 entries"):
        TrainSample([1], [2, 3], [-1.0, -1.0], 1.0, [1])
    with pytest.raises(ValueError, match="0 or 1"):
        TrainSample([1], [2], [-1.0], 1.0, [2])
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        TrainSample([], [2], [-1.0], 1.0)
    with pytest.raises(ValueError, match="reward must be finite"):
        TrainSample([1], [2], [-1.0], float("nan"))
    with pytest.raises(ValueError, match=r"clip_low=1\.5"):
        GRPOConfig(clip_low=1.5)
    with pytest.raises(ValueError, match="micro_batch_tokens=0"):
        GRPOConfig(micro_batch_tokens=0)
