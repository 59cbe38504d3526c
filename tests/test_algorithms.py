"""The critic-free estimators on the PPO loop: rloo, grpo, dr_grpo, reinforce_pp.

The math of each estimator has hand-number tests in test_estimators.py; here the trainer must feed
it the right numbers (the batch's scores and KL, k consecutive samples per prompt), build no value
head, aggregate the loss as the paper does, and learn.

Shapes: B sequences, R response tokens.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import make_tiny_lm
from rlhf.cli import main
from rlhf.core import masked_whiten
from rlhf.errors import ConfigError
from rlhf.models.reward_model import RewardModel
from rlhf.rl.config import PPOConfig
from rlhf.rl.trainer import PPOTrainer

PROMPTS = ["the plot", "this phone is great . the battery", "i watched this film and", "the"]
SMALL = dict(batch_size=4, minibatch_size=8, ppo_epochs=2, response_tokens=6, steps=10, lr=1e-3)


def _biased_lm(tok, seed: int) -> nn.Module:
    """A tiny model with a bias toward EOS, so responses have different lengths."""
    lm = make_tiny_lm(tok, seed=seed)
    old = lm.lm_head
    lm.lm_head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        lm.lm_head.weight.copy_(old.weight)
        lm.lm_head.bias.zero_()
        lm.lm_head.bias[tok.eos_token_id] = 4.0
    return lm


def _trainer(tok, **config) -> PPOTrainer:
    """The reference is another random model, so the KL (and its place in the reward) matters."""
    reward_model = RewardModel(make_tiny_lm(tok, seed=2), tokenizer=tok)
    cfg = PPOConfig(**{**SMALL, "samples_per_prompt": 2, "kl_coef": 0.5, **config})
    return PPOTrainer(_biased_lm(tok, 0), _biased_lm(tok, 1), reward_model, tok, cfg)


def _sequence_rewards(b, beta: float, kl_in_reward: bool) -> torch.Tensor:
    kl = (b.kl * b.response_mask).sum(1)  # (B,)
    return b.scores - beta * kl if kl_in_reward else b.scores


def test_samples_of_a_prompt_fill_consecutive_rows(tiny_tokenizer):
    trainer = _trainer(
        tiny_tokenizer, advantage_estimator="rloo", samples_per_prompt=3, minibatch_size=6
    )
    b = trainer.rollout(PROMPTS)
    assert b.prompts == [p for p in PROMPTS for _ in range(3)]
    assert len(b) == 12 and len(set(b.texts)) > len(PROMPTS)  # different samples of one prompt


def test_rloo_advantage_is_the_reward_minus_the_other_samples_mean(tiny_tokenizer):
    trainer = _trainer(tiny_tokenizer, advantage_estimator="rloo", samples_per_prompt=2)
    b = trainer.rollout(PROMPTS)
    r = _sequence_rewards(b, trainer.kl_ctl.value, kl_in_reward=True)  # (B,)
    other = r.reshape(-1, 2).flip(1).reshape(-1)  # with k = 2 the other sample is the baseline
    expected = (r - other)[:, None] * b.response_mask  # (B, R)
    torch.testing.assert_close(b.advantages, expected, atol=1e-6, rtol=0)
    assert trainer.policy.value_head is None and trainer.config.kl_in == "reward"


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo"])
def test_group_normalised_advantages_and_a_k3_loss(tiny_tokenizer, estimator):
    trainer = _trainer(tiny_tokenizer, advantage_estimator=estimator, samples_per_prompt=4)
    cfg = trainer.config
    assert (cfg.kl_in, cfg.kl_estimator) == ("loss", "k3")  # the paper's KL, in the loss
    b = trainer.rollout(PROMPTS)
    groups = b.scores.reshape(-1, 4)  # (G, 4): the KL is not in the reward
    centred = groups - groups.mean(1, keepdim=True)
    if estimator == "grpo":
        centred = centred / (groups.std(1, keepdim=True) + 1e-6)
    expected = centred.reshape(-1)[:, None] * b.response_mask  # (B, R)
    torch.testing.assert_close(b.advantages, expected, atol=1e-5, rtol=0)


def test_reinforce_pp_whitens_returns_to_go_over_the_batch(tiny_tokenizer):
    trainer = _trainer(
        tiny_tokenizer, advantage_estimator="reinforce_pp", samples_per_prompt=1, minibatch_size=4
    )
    b = trainer.rollout(PROMPTS)
    beta, mask = trainer.kl_ctl.value, b.response_mask
    rewards = -beta * b.kl * mask
    lengths = mask.sum(1).long()
    rewards[torch.arange(len(b)), lengths - 1] += b.scores
    returns = rewards.flip(1).cumsum(1).flip(1) * mask  # gamma 1: the sum of what follows
    torch.testing.assert_close(b.advantages, masked_whiten(returns, mask), atol=1e-5, rtol=0)
    assert lengths.min() < lengths.max()  # rows of different lengths make the sums differ


@pytest.mark.parametrize(
    "estimator, mode", [("grpo", "seq-mean-token-mean"), ("dr_grpo", "seq-mean-token-sum-norm")]
)
def test_loss_aggregation_follows_the_paper(tiny_tokenizer, estimator, mode, monkeypatch):
    """The minibatch's loss weights: each sequence weighs 1/rows, its tokens 1/length (grpo) or
    1/--response-tokens (dr_grpo)."""
    trainer = _trainer(tiny_tokenizer, advantage_estimator=estimator, samples_per_prompt=2)
    assert trainer.config.loss_aggregation == mode
    seen = []
    original = trainer._micro_loss

    def spy(b, idx, w, response, tw):
        seen.append((b.response_mask[idx], w))
        return original(b, idx, w, response, tw)

    trainer._micro_loss = spy
    trainer.step(PROMPTS)
    mask, w = seen[0]
    lengths = mask.sum(1, keepdim=True)
    per_token = 1 / lengths if estimator == "grpo" else torch.full_like(lengths, 1 / 6)
    torch.testing.assert_close(w, mask * per_token / len(mask), atol=1e-7, rtol=0)


def test_critic_free_runs_train_no_value_head_and_log_no_value_loss(tiny_tokenizer):
    trainer = _trainer(tiny_tokenizer, advantage_estimator="rloo")
    metrics = trainer.step(PROMPTS)
    assert trainer.policy.value_head is None
    assert "loss/value" not in metrics and "val/explained_variance" not in metrics
    assert metrics["policy/first_ratio"] == pytest.approx(1.0, abs=1e-6)


class TokenCountReward(nn.Module):
    """+1 for every attended token whose id is in `target_ids`."""

    def __init__(self, target_ids, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        is_target = torch.zeros(len(tokenizer), dtype=torch.bool)
        is_target[target_ids] = True
        self.register_buffer("is_target", is_target)

    def forward(self, input_ids, attention_mask):
        return (self.is_target[input_ids] & attention_mask.bool()).sum(-1).float()  # (B,)


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "dr_grpo", "reinforce_pp"])
def test_each_estimator_learns_a_toy_reward(tiny_tokenizer, estimator):
    """Without a value head, each estimator raises a toy reward (a third of the vocabulary pays
    +1 per token) by more than 2 tokens' worth out of 8 in 25 steps of 16 sequences."""
    tok = tiny_tokenizer
    prompts = ["the plot", "the acting was", "this phone is", "i watched"]
    in_prompts = {i for p in prompts for i in tok(p)["input_ids"]}
    target = [i for i in range(100, 200) if i not in in_prompts]
    policy = make_tiny_lm(tok, seed=0)
    k = 1 if estimator == "reinforce_pp" else 4
    config = PPOConfig(
        batch_size=16 // k, samples_per_prompt=k, minibatch_size=8, ppo_epochs=4,
        response_tokens=8, lr=3e-3, kl_coef=0.0, steps=25, advantage_estimator=estimator,
    )  # fmt: skip
    trainer = PPOTrainer(policy, copy.deepcopy(policy), TokenCountReward(target, tok), tok, config)
    batch = (prompts * 4)[: 16 // k]
    rewards = [trainer.step(batch)["objective/reward"] for _ in range(25)]
    assert sum(rewards[-5:]) / 5 > rewards[0] + 2.0, rewards


@pytest.mark.parametrize(
    "options, message",
    [
        (
            dict(advantage_estimator="rloo", samples_per_prompt=1),
            "--samples-per-prompt 1: rloo needs at least 2",
        ),
        (
            dict(advantage_estimator="grpo", samples_per_prompt=1),
            "--samples-per-prompt 1: grpo needs at least 2",
        ),
        (
            dict(advantage_estimator="rloo", samples_per_prompt=2, value_model="reward"),
            "--value-model reward",
        ),
        (dict(samples_per_prompt=3, minibatch_size=8), "must divide the 12 sequences of a step"),
        (
            dict(batch_size=7, minibatch_size=4),
            r"--minibatch-size 4 must divide --batch-size 7 "
            r"\(for example --minibatch-size 7, or --batch-size 8\)$",
        ),
        (
            dict(batch_size=4, samples_per_prompt=3, minibatch_size=8),
            r"the 12 sequences of a "
            r"step \(--batch-size x --samples-per-prompt\) \(for example --minibatch-size 6, or "
            r"--batch-size 8\)$",
        ),
    ],
)
def test_bad_estimator_options_are_refused_in_one_line(options, message):
    with pytest.raises(ConfigError, match=message) as info:
        PPOConfig(**{**SMALL, **options}).validate()
    assert "\n" not in str(info.value)


def test_cli_refuses_one_sample_for_a_group_method(tmp_path, capsys):
    assert main(["ppo", "--advantage-estimator", "grpo", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--samples-per-prompt 1: grpo" in err, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_pass_grpo_skips_the_old_logprob_pass_and_changes_nothing(tiny_tokenizer, dtype):
    """With one update on the whole batch and the KL in the loss, the old log-probs are the
    update's own: the rollout's policy pass is skipped (TRL's GRPO with one iteration) and the
    step computes what the two-pass step computes (to float precision); the ratio is exactly 1."""
    options = dict(advantage_estimator="grpo", samples_per_prompt=2, ppo_epochs=1,
                   minibatch_size=2 * len(PROMPTS), dtype=dtype)  # fmt: skip
    one, two = _trainer(tiny_tokenizer, **options), _trainer(tiny_tokenizer, **options)
    assert one.one_pass
    two.one_pass = False  # the separate no-gradient pass, as before
    calls = {"one": 0, "two": 0}
    for name, trainer in (("one", one), ("two", two)):
        forward = trainer._policy_forward

        def counted(*args, _forward=forward, _name=name, **kwargs):
            calls[_name] += 1
            return _forward(*args, **kwargs)

        trainer._policy_forward = counted
    m_one, m_two = one.step(PROMPTS), two.step(PROMPTS)
    assert calls["two"] == calls["one"] + 1  # one rollout chunk's pass fewer
    assert m_one["policy/approxkl"] == 0.0 and m_one["policy/clipfrac"] == 0.0  # log-ratio 0
    assert m_one["policy/first_ratio"] == pytest.approx(1.0, abs=1e-6)
    b1, b2 = one.last_rollout, two.last_rollout
    assert b1.texts == b2.texts  # the same samples: sampling does not use the skipped pass
    tol = 1e-5 if dtype == "float32" else 2e-2
    mask = b1.response_mask  # after EOS the two-pass rollout keeps log-probs nothing reads
    torch.testing.assert_close(b1.logprobs, b2.logprobs * mask, atol=tol, rtol=0)
    torch.testing.assert_close(b1.kl, b2.kl, atol=tol, rtol=0)
    for key in ("objective/kl", "objective/kl_penalty", "loss/policy", "objective/reward"):
        assert m_one[key] == pytest.approx(m_two[key], abs=tol), key
    for p1, p2 in zip(one.policy.parameters(), two.policy.parameters()):
        torch.testing.assert_close(p1, p2, atol=tol / 10, rtol=0)
