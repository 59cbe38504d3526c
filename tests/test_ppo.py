"""PPOTrainer and `rlhf ppo`: the details of ppo-details.md that decide whether PPO-RLHF works.

Ratio 1 at the first minibatch; nothing after EOS reaches a loss; left padding does not change
log-probs; frozen reference and reward model; KL and score in the per-token reward; temperature;
the missing-EOS penalty; the adaptive KL controller by hand; config errors; learning a toy reward;
the seed's `ppo_step`; determinism; a smoke test of the command line. The math of core.py has its
own tests in test_core.py.

Shapes: B batch, P prompt tokens, R response tokens, V vocabulary.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import PROMPTS, make_tiny_lm
from rlhf import core
from rlhf.errors import ConfigError
from rlhf.models.forward import position_ids_from_mask
from rlhf.models.reward_model import RewardModel
from rlhf.rl.config import AdaptiveKLController, FixedKLController, PPOConfig
from rlhf.rl.trainer import PPOTrainer

SMALL = dict(batch_size=8, minibatch_size=4, ppo_epochs=2, response_tokens=6, steps=10)


def _eos_bias(lm: nn.Module, tokenizer, bias: float) -> nn.Module:
    """Give the output layer a bias toward EOS, so that some responses end and others run out.

    A tiny random model is nearly uniform over 300 tokens; with bias b, p(EOS) ~ e^b / (e^b + 299).
    """
    old = lm.lm_head
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = bias
    lm.lm_head = head
    return lm


def _trainer(tok, arch="gpt2", eos_bias=0.0, ref_seed=None, rm_seed=2, **config) -> PPOTrainer:
    """A tiny policy, a reference (a copy, or another random model when `ref_seed` is given) and a
    tiny random reward model, in a trainer with small batch sizes."""
    policy = make_tiny_lm(tok, arch, seed=0)
    if eos_bias:
        _eos_bias(policy, tok, eos_bias)
    if ref_seed is None:
        ref = copy.deepcopy(policy)
    else:
        ref = make_tiny_lm(tok, arch, seed=ref_seed)
        if eos_bias:
            _eos_bias(ref, tok, eos_bias)
    reward_model = RewardModel(make_tiny_lm(tok, arch, seed=rm_seed), tokenizer=tok)
    return PPOTrainer(policy, ref, reward_model, tok, PPOConfig(**{**SMALL, **config}))


def _prompt_len(b) -> int:
    return b.query_response.shape[1] - b.response_mask.shape[1]


def _raw_logits(lm: nn.Module, ids: torch.Tensor, mask: torch.Tensor, P: int) -> torch.Tensor:
    """Unscaled logits that predict the response tokens, computed here without the trainer."""
    with torch.no_grad():
        out = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    return out.logits[:, P - 1 : -1]  # (B, R, V)


def _gathered_log_softmax(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)  # (B, R)


def _clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _response_mask_here(response: torch.Tensor, eos: int) -> torch.Tensor:
    """1 up to and including each row's first EOS, written out with a loop (not core's)."""
    mask = torch.zeros(response.shape)  # (B, R)
    for i, row in enumerate(response.tolist()):
        mask[i, : row.index(eos) + 1 if eos in row else len(row)] = 1
    return mask


def _token_kl_here(policy_lm: nn.Module, ref: nn.Module, b, eos: int, exact: bool = False):
    """Per-token KL(policy || ref) on the rollout's responses and the mask, computed here from the
    models and the sampled tokens only: k1 on the sampled token, or the exact KL over the
    vocabulary. Returns (kl (B, R), mask (B, R))."""
    P = _prompt_len(b)
    response = b.query_response[:, P:]  # (B, R)
    mask = _response_mask_here(response, eos)  # (B, R)
    attention = torch.cat([b.attention_mask[:, :P], mask.long()], 1)  # (B, P+R)
    logp = F.log_softmax(_raw_logits(policy_lm, b.query_response, attention, P), -1)  # (B, R, V)
    logq = F.log_softmax(_raw_logits(ref, b.query_response, attention, P), -1)  # (B, R, V)
    if exact:
        kl = (logp.exp() * (logp - logq)).sum(-1)  # (B, R)
    else:
        kl = (logp - logq).gather(-1, response[..., None]).squeeze(-1)  # (B, R)
    return kl * mask, mask


# ---------------------------------------------------------------------------------------------
# 1. The ratio is exactly 1 before the first gradient step
# ---------------------------------------------------------------------------------------------


def test_rollout_logprobs_are_recomputed_exactly_per_minibatch(tiny_tokenizer):
    trainer = _trainer(tiny_tokenizer, eos_bias=3.5)
    b = trainer.rollout(PROMPTS)
    P = _prompt_len(b)
    assert (b.attention_mask[:, :P] == 0).any(), "the prompts should be left-padded"
    assert len(set(b.response_mask.sum(1).tolist())) > 1, "responses should have different lengths"
    for mb in (torch.arange(0, 4), torch.arange(4, 8), torch.tensor([6, 1, 3, 0])):
        with torch.no_grad():
            logits, _ = trainer._policy_forward(b.query_response[mb], b.attention_mask[mb], P)
        mb_logprobs = core.logprobs_from_logits(logits, b.query_response[mb, P:])  # (M, R)
        keep = b.response_mask[mb].bool()
        torch.testing.assert_close(mb_logprobs[keep], b.logprobs[mb][keep], atol=1e-6, rtol=0)
    stats = trainer.update(b)
    assert stats["policy/first_ratio"] == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# 2. Tokens after EOS and padded positions change no loss
# ---------------------------------------------------------------------------------------------


def _garble(b, vocab_size: int):
    """The rollout with random token ids after EOS and nan wherever response_mask is 0."""
    keep = b.response_mask.bool()  # (B, R)
    P = _prompt_len(b)
    gen = torch.Generator().manual_seed(123)
    random_ids = torch.randint(2, vocab_size, keep.shape, generator=gen)  # (B, R)
    query_response = b.query_response.clone()  # (B, P+R)
    query_response[:, P:] = torch.where(keep, b.query_response[:, P:], random_ids)

    def nan_outside(x):
        return torch.where(keep, x, torch.full_like(x, float("nan")))

    garbled = dataclasses.replace(
        b,
        query_response=query_response,
        **{
            k: nan_outside(getattr(b, k))
            for k in ("logprobs", "ref_logprobs", "values", "advantages", "returns")
        },
    )
    assert not torch.equal(garbled.query_response, b.query_response)
    return garbled


def test_tokens_after_eos_do_not_change_logits_at_real_positions(tiny_tokenizer):
    trainer = _trainer(tiny_tokenizer, eos_bias=3.5)
    b = trainer.rollout(PROMPTS)
    assert not all(b.ended) and any(b.ended)
    garbled = _garble(b, len(tiny_tokenizer))
    P = _prompt_len(b)
    keep = b.response_mask.bool()
    with torch.no_grad():
        logits, values = trainer._policy_forward(b.query_response, b.attention_mask, P)
        g_logits, g_values = trainer._policy_forward(
            garbled.query_response, garbled.attention_mask, P
        )
    assert torch.equal(logits[keep], g_logits[keep])
    assert torch.equal(values[keep], g_values[keep])


@pytest.mark.parametrize(
    "kl_in",
    [
        "reward",
        "loss",
    ],
)
def test_garbage_after_eos_changes_no_loss_and_no_update(tiny_tokenizer, kl_in):
    config = dict(eos_bias=3.5, ref_seed=1, kl_in=kl_in, kl_estimator="k3", lr=1e-3)
    clean, dirty = _trainer(tiny_tokenizer, **config), _trainer(tiny_tokenizer, **config)
    b = clean.rollout(PROMPTS)
    assert not all(b.ended) and any(b.ended)
    clean_stats = clean.update(b)
    dirty_stats = dirty.update(_garble(b, len(tiny_tokenizer)))
    for key, value in clean_stats.items():
        assert dirty_stats[key] == pytest.approx(value, abs=1e-6, rel=1e-6), key
    for (name, p), q in zip(clean.policy.named_parameters(), dirty.policy.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)


# ---------------------------------------------------------------------------------------------
# 3. Left padding and position ids
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_response_logprobs_do_not_depend_on_left_padding(tiny_tokenizer, arch):
    # Greedy sampling (top_k=1), so the short prompt gets the same response alone and batched:
    # that checks the KV-cached positions in generation as well as the full forward passes.
    # PPOConfig.validate refuses top-k (the log-probs are those of the full softmax), so it is set
    # after construction: this test compares rollouts, it trains nothing.
    trainer = _trainer(tiny_tokenizer, arch=arch, ref_seed=1, batch_size=2, minibatch_size=1)
    trainer.config.top_k = 1
    short, long = "the plot", "i watched this film and i loved every minute of it"
    alone, batched = trainer.rollout([short]), trainer.rollout([short, long])
    assert _prompt_len(batched) > _prompt_len(alone)  # the short prompt is left-padded
    n = int(alone.response_mask[0].sum())
    assert n == int(batched.response_mask[0].sum()) and n >= 2
    assert torch.equal(alone.query_response[0, -alone.response_mask.shape[1] :][:n],
                       batched.query_response[0, _prompt_len(batched) :][:n])  # fmt: skip
    for name in ("logprobs", "ref_logprobs", "values"):
        torch.testing.assert_close(
            getattr(batched, name)[0, :n], getattr(alone, name)[0, :n], atol=2e-5, rtol=0, msg=name
        )
    torch.testing.assert_close(batched.scores[0], alone.scores[0], atol=2e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# 4. Only the policy and its value head learn
# ---------------------------------------------------------------------------------------------


def test_step_trains_the_policy_and_value_head_but_not_reference_or_reward_model(tiny_tokenizer):
    trainer = _trainer(tiny_tokenizer, eos_bias=3.5, ref_seed=1, lr=1e-3)
    ref_before, rm_before = _clone_state(trainer.ref_model), _clone_state(trainer.reward_model)
    lm_before = _clone_state(trainer.policy.lm)
    assert torch.all(trainer.policy.value_head.weight == 0)
    trainer.step(PROMPTS)
    for model in (trainer.ref_model, trainer.reward_model):
        assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert _same_state(_clone_state(trainer.ref_model), ref_before)
    assert _same_state(_clone_state(trainer.reward_model), rm_before)
    lm_after = _clone_state(trainer.policy.lm)
    assert any(not torch.equal(lm_after[k], lm_before[k]) for k in lm_before)
    assert trainer.policy.value_head.weight.abs().sum() > 0
    assert trainer.policy.value_head.bias.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# 5. Score and KL in the per-token reward; temperature
# ---------------------------------------------------------------------------------------------


def test_score_sits_at_eos_or_last_column_and_matches_the_reward_model(tiny_tokenizer):
    trainer = _trainer(tiny_tokenizer, eos_bias=3.5, kl_coef=0.0)
    b = trainer.rollout(PROMPTS)
    P, R = _prompt_len(b), b.response_mask.shape[1]
    eos = tiny_tokenizer.eos_token_id
    assert any(b.ended) and not all(b.ended)
    lengths = b.response_mask.sum(1).long()
    expected = torch.zeros_like(b.rewards)
    for i in range(len(PROMPTS)):
        last = int(lengths[i]) - 1
        expected[i, last] = b.scores[i]
        if b.ended[i]:
            assert b.query_response[i, P + last] == eos  # the EOS position
            ids, mask = (
                b.query_response[i : i + 1, : P + last + 1],
                b.attention_mask[i : i + 1, : P + last + 1],
            )
        else:
            assert last == R - 1  # the last column
            ids = torch.cat([b.query_response[i : i + 1], torch.tensor([[eos]])], 1)
            mask = torch.cat([b.attention_mask[i : i + 1], torch.ones(1, 1, dtype=torch.long)], 1)
        with torch.no_grad():
            torch.testing.assert_close(
                trainer.reward_model(ids, mask)[0], b.scores[i], atol=1e-5, rtol=0
            )
    torch.testing.assert_close(b.rewards, expected, atol=0, rtol=0)


def test_kl_penalty_is_in_every_token_reward(tiny_tokenizer):
    beta = 0.3
    trainer = _trainer(tiny_tokenizer, eos_bias=3.5, ref_seed=1, kl_coef=beta)
    b = trainer.rollout(PROMPTS)
    lengths = b.response_mask.sum(1).long()
    kl = (b.logprobs - b.ref_logprobs) * b.response_mask  # k1 on sampled tokens
    torch.testing.assert_close(b.kl, kl, atol=1e-6, rtol=0)
    assert (b.kl != 0).any()
    expected = -beta * kl
    expected[torch.arange(len(PROMPTS)), lengths - 1] += b.scores
    torch.testing.assert_close(b.rewards, expected, atol=1e-6, rtol=0)
    assert torch.all(b.rewards[b.response_mask == 0] == 0)


def test_temperature_scales_logits_for_policy_reference_and_exact_kl(tiny_tokenizer):
    T = 0.7
    trainer = _trainer(
        tiny_tokenizer, eos_bias=3.5, ref_seed=1, temperature=T, kl_estimator="exact"
    )
    b = trainer.rollout(PROMPTS)
    P = _prompt_len(b)
    response = b.query_response[:, P:]
    keep = b.response_mask.bool()
    policy_logits = _raw_logits(trainer.policy.lm, b.query_response, b.attention_mask, P) / T
    ref_logits = _raw_logits(trainer.ref_model, b.query_response, b.attention_mask, P) / T
    logprobs = _gathered_log_softmax(policy_logits, response)
    ref_logprobs = _gathered_log_softmax(ref_logits, response)
    torch.testing.assert_close(b.logprobs[keep], logprobs[keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(b.ref_logprobs[keep], ref_logprobs[keep], atol=1e-5, rtol=0)
    # Untempered log-probs are clearly different: the test can tell.
    untempered = _gathered_log_softmax(policy_logits * T, response)
    assert (b.logprobs[keep] - untempered[keep]).abs().max() > 1e-2
    kl = core.compute_kl_penalty(policy_logits, ref_logits, b.response_mask)
    torch.testing.assert_close(b.kl, kl, atol=1e-6, rtol=0)
    assert torch.all(b.kl[keep] > 0) and torch.all(b.kl[~keep] == 0)


# ---------------------------------------------------------------------------------------------
# 6. Missing-EOS penalty
# ---------------------------------------------------------------------------------------------


def test_missing_eos_penalty_replaces_only_the_scores_of_unfinished_rows(tiny_tokenizer):
    penalty = -3.0
    config = dict(eos_bias=5.0, response_tokens=2, kl_coef=0.0)
    plain = _trainer(tiny_tokenizer, **config).rollout(PROMPTS)
    penalised = _trainer(tiny_tokenizer, missing_eos_penalty=penalty, **config).rollout(PROMPTS)
    assert torch.equal(plain.query_response, penalised.query_response)  # same seed, same samples
    ended = torch.tensor(penalised.ended)
    assert ended.any() and not ended.all()
    assert torch.all(penalised.scores[~ended] == penalty)
    assert torch.all(plain.scores[~ended] != penalty)
    assert torch.equal(penalised.scores[ended], plain.scores[ended])
    assert torch.all(penalised.rewards[~ended, -1] == penalty)


# ---------------------------------------------------------------------------------------------
# 7. Adaptive KL controller (Ziegler et al. 2019), numbers by hand
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kl, beta",
    [
        (12.0, 0.100128),  # error 1.0 clipped to 0.2: 0.1 * (1 + 0.2 * 64 / 10000)
        (6.0, 0.1),  # on target
        (6.6, 0.100064),  # error 0.1, not clipped: 0.1 * (1 + 0.1 * 64 / 10000)
        (3.0, 0.099872),  # error -0.5 clipped to -0.2: 0.1 * (1 - 0.2 * 64 / 10000)
        (0.0, 0.099872),
    ],
)
def test_adaptive_kl_controller_by_hand(kl, beta):
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(kl, 64)
    assert ctl.value == pytest.approx(beta, rel=1e-12)


def test_adaptive_kl_compounds_and_fixed_kl_stays():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 64)
    ctl.update(12.0, 64)
    assert ctl.value == pytest.approx(0.1 * 1.00128**2, rel=1e-12)
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.value == 0.1


def test_objective_kl_is_summed_over_tokens_and_averaged_over_sequences(tiny_tokenizer):
    trainer = _distant_reference(_trainer(tiny_tokenizer, eos_bias=3.5, ref_seed=1, lr=1e-3))
    before = copy.deepcopy(trainer.policy.lm)  # the policy that sampled the rollout
    metrics = trainer.step(PROMPTS)
    b = trainer.last_rollout
    kl, mask = _token_kl_here(before, trainer.ref_model, b, tiny_tokenizer.eos_token_id)
    assert len(set(mask.sum(1).tolist())) > 1  # responses of different lengths
    per_sequence = kl.sum(1).mean().item()  # nats per sequence
    assert metrics["objective/kl"] == pytest.approx(per_sequence, rel=1e-5, abs=1e-6)
    # The other reductions give clearly different numbers, so the test can tell them apart.
    per_token = (kl.sum() / mask.sum()).item()
    assert abs(per_sequence - per_token) > 0.5 and abs(per_sequence - kl.sum().item()) > 0.5


def test_trainer_feeds_the_sequence_kl_to_the_adaptive_controller(tiny_tokenizer):
    # A reference about 3 nats per sequence away and a target of 3, so that the error is not
    # clipped and the new beta depends on the KL's exact value.
    trainer = _distant_reference(
        _trainer(tiny_tokenizer, eos_bias=3.5, ref_seed=1, adaptive_kl=True, kl_coef=0.1,
                 target_kl=3.0, kl_horizon=100)
    )  # fmt: skip
    before = copy.deepcopy(trainer.policy.lm)
    # Aim the target 10% above the first batch's KL (read off a rollout of the same draws), so
    # the controller's error is about -0.1 whatever the sample: inside the clip, as intended.
    draws = trainer.generator.get_state()
    probe = trainer.rollout(PROMPTS)
    trainer.generator.set_state(draws)
    trainer.kl_ctl.target = ((probe.logprobs - probe.ref_logprobs) * probe.response_mask).sum(
        1
    ).mean().item() / 0.9
    m1 = trainer.step(PROMPTS)
    assert m1["objective/kl_coef"] == 0.1
    # The KL the controller must see, computed here: summed over tokens, averaged over sequences.
    kl, _ = _token_kl_here(
        before, trainer.ref_model, trainer.last_rollout, tiny_tokenizer.eos_token_id
    )
    error = kl.sum(1).mean().item() / trainer.kl_ctl.target - 1.0
    assert 0 < abs(error) < 0.2
    expected = 0.1 * (1 + error * len(PROMPTS) / 100)
    assert trainer.kl_ctl.value == pytest.approx(expected, rel=1e-6)
    m2 = trainer.step(PROMPTS)
    assert m2["objective/kl_coef"] == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# 7b. The KL as a loss term (--kl-in loss) pulls the policy toward the reference
# ---------------------------------------------------------------------------------------------


def _distant_reference(trainer: PPOTrainer) -> PPOTrainer:
    """Shift the reference's output biases by seeded N(0, 1) noise: two random tiny models are
    nearly uniform and barely differ (about 0.07 nats per sequence); this makes it about 3."""
    bias = trainer.ref_model.lm_head.bias  # the EOS-biased head of `_eos_bias`
    with torch.no_grad():
        bias += torch.randn(bias.shape, generator=torch.Generator().manual_seed(5))
    return trainer


def _exact_sequence_kl(trainer: PPOTrainer, b, eos: int) -> float:
    kl, _ = _token_kl_here(trainer.policy.lm, trainer.ref_model, b, eos, exact=True)
    return kl.sum(1).mean().item()


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_kl_loss_term_moves_the_policy_toward_the_reference(tiny_tokenizer, estimator):
    # Two trainers with the same weights update on the same rollout (with --kl-in loss the rollout
    # does not depend on beta); only beta differs. The KL term must leave the policy closer to the
    # reference than the same update without it: a deleted term gives equal KLs, a flipped sign a
    # larger one.
    eos = tiny_tokenizer.eos_token_id
    config = dict(eos_bias=3.5, ref_seed=1, kl_in="loss", kl_estimator=estimator, lr=1e-3)
    free = _distant_reference(_trainer(tiny_tokenizer, kl_coef=0.0, **config))
    held = _distant_reference(_trainer(tiny_tokenizer, kl_coef=1.0, **config))
    b = free.rollout(PROMPTS)
    start = _exact_sequence_kl(free, b, eos)
    free.update(b)
    held.update(b)
    kl_free, kl_held = _exact_sequence_kl(free, b, eos), _exact_sequence_kl(held, b, eos)
    # Measured: start 3.13, without the term 3.01, with it 2.87 (k2) and 2.82 (k3); with the sign
    # flipped 3.30.
    assert kl_held < kl_free - 0.03 * start, (start, kl_free, kl_held)


# ---------------------------------------------------------------------------------------------
# 8. Config validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, option",
    [
        (dict(batch_size=8, minibatch_size=3), "--minibatch-size"),
        (dict(kl_coef=-0.1), "--kl-coef"),
        (dict(kl_estimator="exact", kl_in="loss"), "--kl-estimator"),
        (dict(kl_in="loss", kl_estimator="k1"), "--kl-estimator k3"),  # a zero-mean gradient
        (dict(top_k=5), "--top-k 5"),
        (dict(top_p=0.9), "--top-p 0.9"),
        (dict(temperature=0.0), "--temperature"),
        (dict(steps=0), "--steps"),
    ],
)
def test_bad_config_raises_config_error_naming_the_option(tiny_tokenizer, config, option):
    with pytest.raises(ConfigError, match=option):
        _trainer(tiny_tokenizer, **config)


def test_kl_in_loss_alone_takes_k3():
    """--kl-estimator auto resolves to k3 in the loss (k1 would be refused) and k1 in the reward."""
    in_loss, in_reward = PPOConfig(kl_in="loss"), PPOConfig()
    in_loss.validate()
    in_reward.validate()
    assert (in_loss.kl_estimator, in_reward.kl_estimator, in_reward.kl_in) == ("k3", "k1", "reward")


@pytest.mark.parametrize(
    "config",
    [
        dict(kl_estimator="exact", kl_in="loss"),
        dict(kl_estimator="k1", kl_in="loss"),
        dict(top_k=1),
        dict(top_p=0.5),
        dict(kl_estimator="k4"),
        dict(kl_in="rewards"),
        dict(adaptive_kl=True, kl_horizon=0),
    ],
)
def test_validate_checks_every_choice_up_front(config):
    with pytest.raises(ConfigError):
        PPOConfig(**config).validate()


@pytest.mark.parametrize("shared", ["reference", "reward trunk"])
def test_policy_passed_as_its_own_reference_or_reward_trunk_is_refused(tiny_tokenizer, shared):
    # Training would move the frozen reference (or the reward model) along with the policy.
    policy = make_tiny_lm(tiny_tokenizer)
    ref = policy if shared == "reference" else copy.deepcopy(policy)
    trunk = policy if shared == "reward trunk" else make_tiny_lm(tiny_tokenizer, seed=2)
    reward_model = RewardModel(trunk, tokenizer=tiny_tokenizer)
    with pytest.raises(ConfigError, match="must be separate copies of the policy"):
        PPOTrainer(policy, ref, reward_model, tiny_tokenizer, PPOConfig(**SMALL, lr=1e-3))


# ---------------------------------------------------------------------------------------------
# 9. A short run raises a toy reward
# ---------------------------------------------------------------------------------------------


class TokenCountReward(nn.Module):
    """A hand-set reward model: +1 for every attended token whose id is in `target_ids`."""

    def __init__(self, target_ids: list[int], tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        is_target = torch.zeros(len(tokenizer), dtype=torch.bool)
        is_target[target_ids] = True
        self.register_buffer("is_target", is_target)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return (self.is_target[input_ids] & attention_mask.bool()).sum(-1).float()  # (B,)


def _learn_toy_reward(tok, seed: int, steps: int = 25) -> list[float]:
    prompts = ["the plot", "the acting was", "this phone is", "i watched"] * 4
    in_prompts = {i for p in prompts for i in tok(p)["input_ids"]}
    target = [i for i in range(100, 200) if i not in in_prompts]  # a third of the vocabulary
    policy = make_tiny_lm(tok, seed=seed)
    config = PPOConfig(
        batch_size=16, minibatch_size=8, ppo_epochs=4, response_tokens=8, lr=3e-3, kl_coef=0.0,
        steps=steps, seed=seed,
    )  # fmt: skip
    trainer = PPOTrainer(policy, copy.deepcopy(policy), TokenCountReward(target, tok), tok, config)
    return [trainer.step(prompts)["objective/reward"] for _ in range(steps)]


@pytest.mark.parametrize("seed", [0, 1])
def test_short_run_raises_a_toy_reward(tiny_tokenizer, seed):
    rewards = _learn_toy_reward(tiny_tokenizer, seed)
    # About 8/3 target tokens per response at the start, out of 8.
    assert sum(rewards[-5:]) / 5 > rewards[0] + 2.0, rewards


# ---------------------------------------------------------------------------------------------
# 10. The seed's call form
# ---------------------------------------------------------------------------------------------


def _ppo_step_trainer(policy):
    """The trainer `ppo_step` keeps for this policy (the one place that knows where it lives)."""
    return policy.__dict__["_rlhf_ppo_trainer"]


def test_ppo_step_continues_one_trainer_per_policy(tiny_tokenizer):
    from rlhf.rl.run import ppo_step

    policy = make_tiny_lm(tiny_tokenizer)
    ref = copy.deepcopy(policy)
    reward_model = RewardModel(make_tiny_lm(tiny_tokenizer, seed=2), tokenizer=tiny_tokenizer)
    before = _clone_state(policy)
    prompts = PROMPTS[:4]
    first = ppo_step(policy, reward_model, ref, prompts, kl_coef=0.1)
    for key in (
        "objective/reward", "objective/kl", "objective/combined", "policy/approxkl", "policy/clipfrac",
        "loss/policy", "loss/value",
    ):  # fmt: skip
        assert key in first and isinstance(first[key], float), key
    trainer = _ppo_step_trainer(policy)
    after_one = _clone_state(policy)
    assert not _same_state(after_one, before)
    adam_steps = trainer.optimizer.state[next(iter(trainer.params))]["step"].item()
    ppo_step(policy, reward_model, ref, prompts, kl_coef=0.1)
    assert _ppo_step_trainer(policy) is trainer
    assert trainer.step_count == 2
    assert trainer.optimizer.state[next(iter(trainer.params))]["step"].item() == 2 * adam_steps
    assert not _same_state(_clone_state(policy), after_one)
    assert _same_state(_clone_state(ref), before)


def test_ppo_step_does_not_keep_the_policy_alive(tiny_tokenizer):
    from rlhf.rl.run import ppo_step

    policy = make_tiny_lm(tiny_tokenizer)
    reward_model = RewardModel(make_tiny_lm(tiny_tokenizer, seed=2), tokenizer=tiny_tokenizer)
    ppo_step(policy, reward_model, copy.deepcopy(policy), PROMPTS[:2], kl_coef=0.1)
    alive = weakref.ref(policy)
    del policy, reward_model
    gc.collect()
    assert alive() is None


# ---------------------------------------------------------------------------------------------
# 11. Determinism
# ---------------------------------------------------------------------------------------------


def test_same_seed_gives_the_same_run(tiny_tokenizer):
    runs = []
    for _ in range(2):
        trainer = _trainer(tiny_tokenizer, eos_bias=3.5, ref_seed=1, lr=1e-3, seed=7)
        runs.append([trainer.step(PROMPTS) for _ in range(2)])
    for a, b in zip(*runs):
        for key in (
            "objective/reward",
            "objective/kl",
            "loss/policy",
            "loss/value",
            "policy/approxkl",
        ):
            assert a[key] == pytest.approx(b[key], abs=1e-6, rel=0), key


# ---------------------------------------------------------------------------------------------
# 12. The command line
# ---------------------------------------------------------------------------------------------

REQUIRED_METRICS = (
    "step", "objective/reward", "objective/kl", "objective/combined", "objective/kl_coef",
    "policy/approxkl", "policy/clipfrac", "policy/entropy", "loss/policy", "loss/value",
    "val/explained_variance", "time/step_s",
)  # fmt: skip


def test_cli_ppo_smoke(tmp_path, ppo_inputs):
    from transformers import AutoModelForCausalLM

    from rlhf.cli import main

    model_dir, rm_dir, prompts = ppo_inputs
    out = tmp_path / "run"
    argv = [
        "ppo", "--model", str(model_dir), "--reward-model", str(rm_dir), "--prompts", str(prompts),
        "--out", str(out), "--steps", "3", "--batch-size", "4", "--minibatch-size", "2",
        "--response-tokens", "6",
    ]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert set(REQUIRED_METRICS) <= row.keys(), set(REQUIRED_METRICS) - row.keys()
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and {"step", "prompt", "response", "reward"} <= samples[0].keys()
    config = json.loads((out / "config.json").read_text())
    assert config["batch_size"] == 4 and config["minibatch_size"] == 2 and config["steps"] == 3
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    trained = AutoModelForCausalLM.from_pretrained(out / "policy").state_dict()
    original = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert trained.keys() == original.keys()
    assert any(not torch.equal(trained[k], original[k]) for k in original)


def test_cli_ppo_bad_minibatch_is_one_line_exit_2(tmp_path, ppo_inputs, capsys):
    from rlhf.cli import main

    model_dir, rm_dir, prompts = ppo_inputs
    argv = [
        "ppo", "--model", str(model_dir), "--reward-model", str(rm_dir), "--prompts", str(prompts),
        "--out", str(tmp_path / "run"), "--steps", "3", "--batch-size", "4", "--minibatch-size", "3",
    ]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and "--minibatch-size" in err
    assert not (tmp_path / "run").exists()


def test_a_reward_model_with_another_tokenizer_scores_within_its_own_positions(tiny_tokenizer):
    """A reward model with a tokenizer of its own re-encodes prompt + response; a sequence longer
    than its positions is scored on its last tokens (as train-reward cuts them), and one that
    fits is scored whole: not cut to a fixed 256, and no IndexError past the position table."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from conftest import TINY_TEXTS
    from rlhf.reward.loss import encode_texts
    from rlhf.task.tokenizer import train_tokenizer

    other = train_tokenizer(TINY_TEXTS, vocab_size=262)  # about one token per character
    config = GPT2Config(
        vocab_size=len(other), n_positions=24, n_embd=32, n_layer=2, n_head=2,
        eos_token_id=other.eos_token_id, pad_token_id=other.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(2)
    reward_model = RewardModel(GPT2LMHeadModel(config).eval(), tokenizer=other)
    policy = make_tiny_lm(tiny_tokenizer, seed=0)
    trainer = PPOTrainer(
        policy, copy.deepcopy(policy), reward_model, tiny_tokenizer, PPOConfig(**SMALL)
    )
    assert not trainer.same_tokenizer
    rollout = trainer.rollout(PROMPTS)
    rows, cut = encode_texts(other, rollout.prompts, rollout.texts, 10**6)
    lengths = [len(r) for r in rows]
    assert max(lengths) > 24 and min(lengths) <= 24  # some are cut, some are whole
    for i, ids in enumerate(rows):
        want = reward_model(torch.tensor([ids[-24:]])).item()
        assert rollout.scores[i].item() == pytest.approx(want, abs=1e-5), (i, len(ids))
