"""Advantage estimators: GAE, REINFORCE++ returns, and the critic-free group baselines (RLOO, GRPO,
Dr. GRPO).

Shapes: B batch (sequences, or preference pairs), G groups of k samples (B = G * k, a prompt's
samples in consecutive rows), T tokens, R response tokens (right-padded after EOS), V vocabulary.
A `mask` is 1 on real tokens and 0 on padding; masked positions never influence a result, even
when they hold garbage (inf, nan): inputs are selected with `torch.where`, not multiplied by it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .stats import _zero_masked

# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------


def compute_gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation over the response axis: (B, R) x3 -> (advantages, returns).

    `mask` must be a suffix mask (responses are right-padded after EOS). Rewards and values at
    masked positions are treated as 0, so the value bootstrapped after the last real token is 0.
    Advantages and returns (= advantages + values) are 0 at masked positions.
    """
    rewards = _zero_masked(rewards, mask)  # (B, R)
    values = _zero_masked(values, mask)  # (B, R)
    next_values = F.pad(values[:, 1:], (0, 1))  # (B, R): V_{t+1}, 0 after the last column
    deltas = rewards + gamma * next_values - values  # (B, R)
    keep = mask.to(deltas.dtype)  # (B, R)

    # A_t = delta_t + gamma * lam * A_{t+1}: a loop over R (small), vectorised over B.
    running = torch.zeros_like(deltas[:, 0])  # (B,)
    reversed_adv = []
    for t in reversed(range(deltas.shape[1])):
        running = (deltas[:, t] + gamma * lam * running) * keep[:, t]  # (B,)
        reversed_adv.append(running)
    advantages = torch.stack(reversed_adv[::-1], dim=1)  # (B, R)
    return advantages, advantages + values


def reinforce_pp_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """REINFORCE++ (Hu et al. 2025) returns-to-go: (B, R), (B, R) -> (B, R), 0 at masked positions.

    `rewards` are per token: -beta * KL at every response token, plus the sequence's score at its
    last token (as PPO builds them). G_t = r_t + gamma * G_{t+1}, with no value baseline; rewards at
    masked positions count as 0 and `mask` must be a suffix mask (right padding after EOS).
    The advantage is then `masked_whiten(returns, mask)` over every real token of the whole batch:
    the global mean is subtracted and the result scaled to unit variance, as OpenRLHF's `reinforce`
    estimator and verl's `compute_reinforce_plus_plus_outcome_advantage` do (OpenRLHF uses the
    biased variance, verl and `masked_var` the unbiased one: a factor sqrt(n / (n - 1)) over n
    tokens). For several micro-batches or ranks the mean and variance must be the batch's, not each
    piece's.
    """
    keep = mask.to(rewards.dtype)  # (B, R)
    rewards = _zero_masked(rewards, mask)  # (B, R)
    running = torch.zeros_like(rewards[:, 0])  # (B,)
    reversed_returns = []
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * keep[:, t]  # (B,)
        reversed_returns.append(running)
    return torch.stack(reversed_returns[::-1], dim=1)  # (B, R)


# ---------------------------------------------------------------------------------------------
# Critic-free group baselines: k samples per prompt, in consecutive rows
# ---------------------------------------------------------------------------------------------


def check_samples_per_prompt(
    k: int, n_rows: int | None = None, method: str = "a group baseline"
) -> None:
    """`ConfigError` unless k >= 2 and k divides `n_rows` (the number of sequences in a batch)."""
    if k < 2:
        raise ConfigError(
            f"--samples-per-prompt {k}: {method} needs at least 2 samples per prompt, because each "
            "sample's baseline comes from the other samples of its prompt and one sample has none"
        )
    if n_rows is not None and n_rows % k:
        raise ConfigError(
            f"--samples-per-prompt {k} must divide the number of sequences in the batch ({n_rows}): "
            "the samples of one prompt fill k consecutive rows"
        )


def _grouped(scores: Tensor, k: int, method: str) -> Tensor:
    """(B,) -> (G, k), after checking k."""
    check_samples_per_prompt(k, scores.shape[0], method)
    return scores.reshape(-1, k)  # (G, k)


def rloo_advantages(scores: Tensor, k: int) -> Tensor:
    """RLOO (Ahmadian et al. 2024): each score minus the mean of the other k - 1 of its prompt.

    (B,) -> (B,). Computed as k / (k - 1) * (score - group mean), which is the same number
    (sum of the others = k * mean - score) without subtracting two large sums. A group of equal
    scores gets exactly 0 (`_centred`).
    """
    centred = _centred(_grouped(scores, k, "rloo"))  # (G, k)
    return (centred * (k / (k - 1))).reshape(-1)  # (B,)


def group_normalised_advantages(
    scores: Tensor, k: int, scale_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO (Shao et al. 2024): (score - group mean) / (group std + eps); (B,) -> (B,).

    The std is the unbiased (Bessel-corrected, divide by k - 1) one, as in TRL's GRPOTrainer
    (`nanstd`), verl's `compute_grpo_outcome_advantage` and OpenRLHF's `group_norm` (`torch.std`);
    the paper does not say. eps = 1e-6 is verl's (TRL 1e-4). A group of equal scores gets exactly
    0, in any dtype (`_centred`).
    `scale_by_std=False` is Dr. GRPO (Liu et al. 2025): the score minus the group mean only.
    """
    centred = _centred(_grouped(scores, k, "grpo" if scale_by_std else "dr_grpo"))  # (G, k)
    if scale_by_std:
        # The std of the centred scores is the std of the scores (shift-invariant).
        centred = centred / (centred.std(dim=1, keepdim=True) + eps)  # (G, k)
    return centred.reshape(-1)  # (B,)


def _centred(grouped: Tensor) -> Tensor:
    """Each score minus its group's mean, (G, k) -> (G, k), exactly 0 for a group of equal scores.

    The group's first score is subtracted before the mean is taken: the result is the same
    number, but a group of equal scores is then all exact zeros, whose mean and std are exactly 0.
    Averaging the raw scores instead rounds (five float32 copies of 123.456 average to a value
    one ulp away), and GRPO's division by a std of ~1e-5 turns that ulp into |A| = 0.8.
    """
    shifted = grouped - grouped[:, :1]  # (G, k)
    return shifted - shifted.mean(dim=1, keepdim=True)  # (G, k)
