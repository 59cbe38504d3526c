"""Phases 2-4 of a step: per-token rewards, advantages and returns, by the chosen estimator.

Shapes: B sequences of the global batch (k consecutive rows per prompt), R response tokens.

Every estimator runs on the whole gathered batch, so group baselines see all k samples of a prompt
and whitening uses every token of the batch, whatever the number of processes.

    gae           PPO: the KL penalty on every token and the score at the last one, GAE with the
                  value head's values (gamma, lambda), advantages whitened over the batch
    rloo          Ahmadian et al. (2024): the sequence's reward (score - beta * summed KL when the
                  KL is in the reward) minus the mean of the other k - 1 samples of its prompt
    grpo          Shao et al. (2024): the score, normalised by its group's mean and std; the KL is
                  a k3 term in the loss by default
    dr_grpo       Liu et al. (2025): as grpo without the division by the std
    reinforce_pp  Hu et al. (2025): per-token rewards as for gae, returns-to-go without a critic,
                  whitened over every token of the batch
The critic-free ones give every token of a sequence its sequence's advantage (rloo, grpo, dr_grpo)
or its return-to-go (reinforce_pp); returns are then the advantages (no value loss uses them).
"""

from __future__ import annotations

import torch

from ..core import (
    compute_gae,
    group_normalised_advantages,
    masked_whiten,
    reinforce_pp_returns,
    rloo_advantages,
)
from .config import PPOConfig
from .rollout import Rollout


def token_rewards(b: Rollout, cfg: PPOConfig, beta: float) -> torch.Tensor:
    """The KL penalty on every token (when it is in the reward) and the score at the last token
    (ppo-details 10, 11): (B, R)."""
    rewards = -beta * b.kl if cfg.kl_in == "reward" else torch.zeros_like(b.kl)  # (B, R)
    lengths = b.response_mask.sum(1).long()  # (B,)
    rewards[torch.arange(len(b), device=rewards.device), lengths - 1] += b.scores
    return rewards


def compute_advantages(b: Rollout, cfg: PPOConfig, beta: float) -> None:
    """Set `b.rewards`, `b.advantages` and `b.returns` (all (B, R), 0 after EOS) in place."""
    mask = b.response_mask  # (B, R)
    rewards = token_rewards(b, cfg, beta)  # (B, R)
    estimator = cfg.advantage_estimator
    if estimator == "gae":
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = compute_gae(rewards, b.values, mask, cfg.gamma, cfg.lam)  # (B, R) x2
        advantages = masked_whiten(advantages, mask)  # ppo-details 16
    elif estimator == "reinforce_pp":
        returns = reinforce_pp_returns(rewards, mask, cfg.gamma)  # (B, R)
        advantages = returns = masked_whiten(returns, mask)
    else:
        sequence_reward = rewards.sum(1)  # (B,): the score, minus beta * summed KL if in the reward
        k = cfg.samples_per_prompt
        if estimator == "rloo":
            per_sequence = rloo_advantages(sequence_reward, k)  # (B,)
        else:
            per_sequence = group_normalised_advantages(
                sequence_reward, k, scale_by_std=estimator == "grpo"
            )  # (B,)
        advantages = returns = per_sequence[:, None] * mask  # (B, R)
    b.rewards, b.advantages, b.returns = rewards, advantages, returns
