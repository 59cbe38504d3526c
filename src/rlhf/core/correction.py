"""Rollout correction: when responses are sampled by another engine (vLLM) than the model that is
trained, the two disagree on each token's probability a little (other kernels, another precision,
fused ops), so the samples come from a policy q that is not the trainer's p. The PPO ratio is
taken against the trainer's own log-probs of the samples (so its first value is still exactly 1);
these weights on the policy loss turn the expectation under q back into one under p.

Shapes: B sequences, R response tokens (right-padded after EOS). `logprobs` are the trainer's log p
of each sampled token, `engine_logprobs` the engine's log q of the same tokens (both after the
temperature); `mask` is 1 on response tokens up to and including the first EOS. Masked positions
never influence a result.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Correction = Literal["none", "tis", "mask"]


def _log_ratio(logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor) -> Tensor:
    """log p - log q per token, 0 where masked: (B, R)."""
    diff = logprobs.float() - engine_logprobs.float()  # (B, R)
    return torch.where(mask.bool(), diff, torch.zeros_like(diff))


def rollout_correction_weights(
    logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor, mode: Correction, cap: float
) -> Tensor:
    """Per-token weights (B, R) on the policy-gradient loss, detached.

    - tis: truncated importance sampling per token, min(p / q, cap) (Yao et al. 2025, "Your
      efficient RL framework secretly brings you off-policy RL training"): unbiased where p / q
      stays below the cap, bounded variance where it does not.
    - mask: 1 for a sequence whose ratio prod(p / q) lies in [1/cap, cap], 0 for the whole
      sequence otherwise (rejection of rollouts the engine got badly wrong; TRL's GRPO masks
      sequences by default, at cap 3).
    - none: all 1.
    Masked positions get weight 1 (the loss weights them 0 anyway).
    """
    if mode == "none":
        return torch.ones_like(logprobs, dtype=torch.float32)
    log_ratio = _log_ratio(logprobs, engine_logprobs, mask).detach()  # (B, R)
    if mode == "tis":
        # exp(min(x, log cap)) = min(exp(x), cap) without overflowing at large x.
        return log_ratio.clamp(max=math.log(cap)).exp()  # (B, R)
    if mode == "mask":
        seq = log_ratio.sum(-1, keepdim=True)  # (B, 1), log prod(p / q)
        keep = seq.abs() <= math.log(cap)  # (B, 1)
        return keep.float().expand_as(log_ratio).clone()  # (B, R)
    raise ValueError(f"unknown rollout correction {mode!r}; one of none, tis, mask")


def mismatch_metrics(
    logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor, mode: Correction, cap: float
) -> dict[str, float]:
    """How far the engine is from the trainer on this batch, and what the correction did.

    rollout/logprob_diff_mean and _max: |log p - log q| per token (mean and max over tokens);
    rollout/seq_ratio_p05, _p50, _p95: quantiles of the sequence ratio prod(p / q) over rows;
    rollout/kl: mean over rows of sum(log q - log p), the k1 estimate of KL(q || p) per sequence;
    rollout/weight_mean: the correction's mean weight over tokens; rollout/corrected_frac: the
    share of tokens (tis: truncated) or of sequences (mask: dropped) that the correction changed.
    """
    valid = mask.bool()
    log_ratio = _log_ratio(logprobs, engine_logprobs, mask)  # (B, R)
    diff = log_ratio.abs()[valid]  # (N,)
    seq = log_ratio.sum(-1)  # (B,)
    q = torch.quantile(seq.double().exp(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
    weights = rollout_correction_weights(logprobs, engine_logprobs, mask, mode, cap)  # (B, R)
    if mode == "mask":
        changed = (weights[:, 0] == 0).float().mean()  # sequences dropped
    else:
        changed = (log_ratio[valid] > math.log(cap)).float().mean() if mode == "tis" else 0.0
    return {
        "rollout/logprob_diff_mean": diff.mean().item() if len(diff) else 0.0,
        "rollout/logprob_diff_max": diff.max().item() if len(diff) else 0.0,
        "rollout/seq_ratio_p05": q[0].item(),
        "rollout/seq_ratio_p50": q[1].item(),
        "rollout/seq_ratio_p95": q[2].item(),
        "rollout/kl": (-seq).mean().item(),
        "rollout/weight_mean": weights[valid].mean().item() if len(diff) else 1.0,
        "rollout/corrected_frac": float(changed),
    }
