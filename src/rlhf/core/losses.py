"""Losses: how per-token losses become one number, the PPO policy and value losses, the
Bradley-Terry reward-model loss and the DPO / IPO loss.

Shapes: B batch (sequences, or preference pairs), G groups of k samples (B = G * k, a prompt's
samples in consecutive rows), T tokens, R response tokens (right-padded after EOS), V vocabulary.
A `mask` is 1 on real tokens and 0 on padding; masked positions never influence a result, even
when they hold garbage (inf, nan): inputs are selected with `torch.where`, not multiplied by it.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .stats import _zero_masked, masked_mean

# ---------------------------------------------------------------------------------------------
# From a per-token loss to a scalar
# ---------------------------------------------------------------------------------------------

LossAggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
LOSS_AGGREGATIONS: tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)


def aggregate_loss_parts(
    per_token_loss: Tensor, mask: Tensor, mode: LossAggregation, norm_length: int | None = None
) -> tuple[Tensor, Tensor]:
    """Numerator and denominator of `aggregate_loss`: (B, R), (B, R) -> (scalar, scalar).

    Both are sums over rows, so for a batch cut into micro-batches (or spread over ranks) the
    numerators add up to the whole batch's and so do the denominators: the loss of a piece is
    its numerator divided by the *global* denominator (which depends only on the masks, so it is
    known before any backward pass), and the gradients of the pieces add up to the whole batch's
    gradient whatever the split (verl's `agg_loss` takes the global counts for the same reason).

    token-mean               sum of real tokens' losses / number of real tokens (PPO, DAPO)
    seq-mean-token-mean      sum over rows of (the row's token mean) / number of rows (GRPO)
    seq-mean-token-sum-norm  sum over rows of (the row's token sum / norm_length) / number of rows
                             (Dr. GRPO; norm_length a constant such as the longest allowed
                             response, never the padded width of a piece, which varies)

    Rows without a real token (padding rows) count in no denominator.
    """
    per_token = _zero_masked(per_token_loss, mask)  # (B, R)
    tokens = mask.to(per_token.dtype).sum(dim=1)  # (B,)
    rows = (tokens > 0).to(per_token.dtype).sum()  # ()
    if mode == "token-mean":
        return per_token.sum(), tokens.sum()
    if mode == "seq-mean-token-mean":
        return (per_token.sum(dim=1) / tokens.clamp(min=1)).sum(), rows
    if mode == "seq-mean-token-sum-norm":
        if norm_length is None or norm_length <= 0:
            raise ValueError("seq-mean-token-sum-norm needs norm_length, a positive constant")
        return per_token.sum() / norm_length, rows
    raise ValueError(
        f"unknown loss aggregation {mode!r}; choose one of {', '.join(LOSS_AGGREGATIONS)}"
    )


def aggregate_loss(
    per_token_loss: Tensor, mask: Tensor, mode: LossAggregation, norm_length: int | None = None
) -> Tensor:
    """A per-token loss (B, R) as one scalar, by `mode` (see `aggregate_loss_parts`); 0 if empty."""
    numerator, denominator = aggregate_loss_parts(per_token_loss, mask, mode, norm_length)
    return numerator / denominator.clamp(min=1)


def loss_token_weights(
    mask: Tensor, mode: LossAggregation, norm_length: int | None = None
) -> Tensor:
    """Per-token weights (B, R) with sum(weights * loss) == aggregate_loss(loss, mask, mode).

    Computed once for a whole minibatch from its masks: any piece of it (a micro-batch, one
    process's share) then gets its exact part of the minibatch's loss as sum(w[piece] * loss[piece]),
    so the gradients of the pieces add up to the whole minibatch's.
    """
    keep = mask.to(torch.float32)  # (B, R)
    tokens = keep.sum(dim=1, keepdim=True)  # (B, 1)
    rows = (tokens > 0).to(keep.dtype).sum().clamp(min=1)  # ()
    if mode == "token-mean":
        return keep / tokens.sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        return keep / tokens.clamp(min=1) / rows
    if mode == "seq-mean-token-sum-norm":
        if norm_length is None or norm_length <= 0:
            raise ValueError("seq-mean-token-sum-norm needs norm_length, a positive constant")
        return keep / norm_length / rows
    raise ValueError(
        f"unknown loss aggregation {mode!r}; choose one of {', '.join(LOSS_AGGREGATIONS)}"
    )


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def policy_loss_per_token(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate per token: (B, R) x4 -> (loss, clipped, log_ratio), each (B, R).

    loss = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)), 0 at masked positions; `clipped`
    is 1.0 where the clipped term is the larger; `log_ratio` = logp - old_logp, 0 where masked.
    How the tokens are averaged is the caller's choice (`policy_loss` takes the masked mean).
    """
    # Zero the log-ratio at padding first, so exp never sees garbage there (no inf, no nan grads).
    log_ratio = _zero_masked(logprobs - old_logprobs, mask)  # (B, R)
    advantages = _zero_masked(advantages, mask)  # (B, R)
    ratio = log_ratio.exp()  # (B, R)
    unclipped = -advantages * ratio  # (B, R)
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)  # (B, R)
    loss = _zero_masked(torch.maximum(unclipped, clipped), mask)  # (B, R)
    was_clipped = _zero_masked((clipped > unclipped).to(ratio.dtype), mask)  # (B, R)
    return loss, was_clipped.detach(), log_ratio


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate, masked mean over all tokens: (B, R) x4 -> (scalar loss, stats).

    Per token: max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)). Stats are detached scalars:
    `clipfrac` (fraction of tokens where the clipped term wins), `approxkl`
    (0.5 * mean (logp - old_logp)^2) and `ratio` (mean ratio).
    """
    loss, clipped, log_ratio = policy_loss_per_token(
        logprobs, old_logprobs, advantages, mask, clip_eps
    )  # (B, R) x3
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean(clipped, mask),
            "approxkl": 0.5 * masked_mean(log_ratio.pow(2), mask),
            "ratio": masked_mean(log_ratio.exp(), mask),
        }
    return masked_mean(loss, mask), stats


def value_loss_per_token(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> tuple[Tensor, Tensor]:
    """Clipped value loss per token: (B, R) x4 -> (loss, clipped), each (B, R), 0 where masked.

    loss = 0.5 * max((V - R)^2, (V_clipped - R)^2) with V_clipped = old_V + clamp(V - old_V, -eps,
    eps); `clipped` is 1.0 where the clipped term is the larger.
    """
    values, old_values, returns = (_zero_masked(t, mask) for t in (values, old_values, returns))
    clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)  # (B, R)
    unclipped_err = (values - returns).pow(2)  # (B, R)
    clipped_err = (clipped_values - returns).pow(2)  # (B, R)
    loss = 0.5 * _zero_masked(torch.maximum(unclipped_err, clipped_err), mask)  # (B, R)
    was_clipped = _zero_masked((clipped_err > unclipped_err).to(values.dtype), mask)  # (B, R)
    return loss, was_clipped.detach()


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss 0.5 * mean max((V - R)^2, (V_clipped - R)^2): (B, R) x4 -> (loss, stats).

    V_clipped = old_V + clamp(V - old_V, -eps, eps). Stat `vf_clipfrac`: fraction of tokens where
    the clipped term wins.
    """
    loss, clipped = value_loss_per_token(values, old_values, returns, mask, clip_eps)  # (B, R) x2
    return masked_mean(loss, mask), {"vf_clipfrac": masked_mean(clipped, mask)}


def bradley_terry_loss(
    r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | float | None = None
) -> Tensor:
    """Reward-model loss: mean of -log sigmoid(r_chosen - r_rejected - margin) over (B,) pairs.

    `margin` (a float or a (B,) tensor) asks the chosen reward to win by that much (Llama 2,
    Touvron et al. 2023). logsigmoid stays finite for any difference; log(sigmoid) does not.
    """
    diff = r_chosen - r_rejected  # (B,)
    if margin is not None:
        diff = diff - margin  # (B,)
    return -F.logsigmoid(diff).mean()


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO loss per pair and implicit rewards: (B,) x4 -> (losses, chosen_rewards, rejected_rewards).

    Inputs are sequence log-probs (summed over response tokens). With the log-ratios
    c = logp_chosen - ref_chosen and r = logp_rejected - ref_rejected:
      sigmoid  (Rafailov et al. 2023): -log sigmoid(beta (c - r)); with label_smoothing eps the
               conservative form (Mitchell 2023, "cDPO"):
               -(1 - eps) log sigmoid(beta (c - r)) - eps log sigmoid(-beta (c - r))
      ipo      (Azar et al. 2023, eq. 17, tau = beta): (c - r - 1 / (2 beta))^2. When the lengths
               (response tokens, (B,)) are given, c and r are first divided by them: TRL does this
               (a summed log-ratio makes the square grow with length; TRL reports the IPO authors
               confirmed it); without lengths it is the paper's formula on the sums.
    The implicit rewards are beta * c and beta * r (not length-normalised), detached.
    """
    chosen_ratio = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_ratio = policy_rejected_logps - ref_rejected_logps  # (B,)
    if loss_type == "sigmoid":
        logits = beta * (chosen_ratio - rejected_ratio)  # (B,)
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(
            -logits
        )  # (B,)
    elif loss_type == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid loss only, not ipo")
        if chosen_lengths is not None and rejected_lengths is not None:
            chosen_ratio = chosen_ratio / chosen_lengths.clamp(min=1)  # (B,)
            rejected_ratio = rejected_ratio / rejected_lengths.clamp(min=1)  # (B,)
        losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)).pow(2)  # (B,)
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; choose sigmoid or ipo")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()  # (B,)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()  # (B,)
    return losses, chosen_rewards, rejected_rewards
