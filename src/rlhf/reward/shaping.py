"""Reward shaping: bounded transforms of the sequence reward before PPO sees it (`--reward-shaping`).

Shapes: B rows (sequences), M reference responses per row.

clip  `clip_rewards`: the reward clamped to [-C, C]
par   `par_rewards`: Preference As Reward (Fu et al. 2025, "Reward Shaping to Mitigate Reward
      Hacking in RLHF"): the mean over M reference responses of sigmoid(r(x, y) - r(x, y_ref)),
      the Bradley-Terry probability that the reward model prefers y to the reference's response.

Both are pure tensor math; the trainer samples and scores the reference responses.
"""

from __future__ import annotations

import torch


def clip_rewards(scores: torch.Tensor, c: float) -> torch.Tensor:
    """`scores` (B,) clamped to [-c, c]."""
    if not c > 0:
        raise ValueError(f"the clip bound must be positive, got {c}")
    return scores.clamp(-c, c)  # (B,)


def par_rewards(scores: torch.Tensor, ref_scores: torch.Tensor) -> torch.Tensor:
    """Preference As Reward: mean over m of sigmoid(scores - ref_scores[:, m]), in (0, 1).

    `scores` (B,) are the policy responses' rewards, `ref_scores` (B, M) those of M reference
    responses to the same prompt. 0.5 for a response as good as the reference's; bounded, and
    steepest near the reference, flat far above it (the paper's two design principles). As in
    the authors' code (github.com/PorUna-byte/PAR, `RewardShaper._shape_par`): no temperature in
    the sigmoid, the mean over the references; the KL penalty then applies as usual. Computed in
    float32 whatever the inputs' dtype.
    """
    if ref_scores.ndim != 2 or ref_scores.shape[0] != scores.shape[0]:
        raise ValueError(
            f"ref_scores must be (B, M) with B = {scores.shape[0]}, got {tuple(ref_scores.shape)}"
        )
    diff = scores.float()[:, None] - ref_scores.float()  # (B, M)
    return torch.sigmoid(diff).mean(1)  # (B,)
