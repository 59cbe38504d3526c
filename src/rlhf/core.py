"""Pure tensor math for RLHF: masked statistics, log-probs, KL, advantage estimators (GAE and the
critic-free group baselines), loss aggregation, and the PPO / reward / DPO losses.

Every function is tensor in, tensor out: no models, no I/O, no global state.

Shape letters used in comments:
    B  batch (sequences, or preference pairs for the reward and DPO losses)
    G  groups (prompts) of k samples each, B = G * k, a prompt's samples in consecutive rows
    T  tokens (any sequence axis)
    R  response tokens (the generated part, right-padded after EOS)
    V  vocabulary

A `mask` is a float or bool tensor shaped like the data: 1 = real token, 0 = padding or after EOS.
Masked positions never influence a result, even when they hold garbage (inf, nan, 1e6): inputs are
selected with `torch.where` rather than multiplied by the mask, because `0 * inf` is nan.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")


def _zero_masked(x: Tensor, mask: Tensor) -> Tensor:
    """`x` with masked positions set to 0; gradients never flow into those positions."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


# ---------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over entries where `mask` is 1; over everything (scalar) or along `dim`.

    An empty selection gives 0 rather than nan, so a minibatch of fully padded rows adds nothing
    to a loss instead of poisoning it.
    """
    total = _zero_masked(x, mask).sum(dim=dim)  # () or x.shape without `dim`
    count = mask.to(total.dtype).sum(dim=dim)  # same shape as `total`
    return total / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Scalar variance of `x` over masked entries; Bessel-corrected when `unbiased` and count > 1."""
    centred = _zero_masked(x - masked_mean(x, mask), mask)  # same shape as x
    count = mask.to(centred.dtype).sum()  # ()
    var = centred.pow(2).sum() / count.clamp(min=1)  # ()
    if unbiased:
        var = torch.where(count > 1, var * count / (count - 1).clamp(min=1), var)  # ()
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Scale `x` to unit variance over masked entries (and zero mean if `shift_mean`).

    Padded positions come out exactly 0. With `shift_mean=False` the mean is kept (as TRL does
    for rewards), only the scale changes.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)  # same shape as x
    if not shift_mean:
        whitened = whitened + mean
    return _zero_masked(whitened, mask)


# ---------------------------------------------------------------------------------------------
# Log-probabilities, entropy, KL
# ---------------------------------------------------------------------------------------------


def logprobs_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """Log-probability of each token under its logits: (B, T, V), (B, T) -> (B, T), float32.

    The log-softmax runs in float32 even for bf16 logits: bf16 log-probs are too coarse for the
    PPO ratio exp(logp - old_logp). It runs one row at a time, so its (T, V) temporaries stay
    small next to the logits (with a 50k vocabulary they are the largest tensors of a step); each
    row's numbers are the ones a whole-batch log-softmax gives.
    """
    rows = [
        F.log_softmax(row.float(), dim=-1).gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)
        for row, ids in zip(logits, tokens)
    ]  # B x (T,)
    return torch.stack(rows) if rows else logits.new_zeros(tokens.shape, dtype=torch.float32)


def _p_log_ratio(logp: Tensor, logq: Tensor) -> Tensor:
    """p * (log p - log q) elementwise with the convention 0 * log 0 = 0 (xlogy-style).

    The difference is replaced *before* the multiply so that neither the value nor the gradient
    sees `0 * inf` where p underflows to 0 or a logit is -inf.
    """
    p = logp.exp()  # same shape as logp
    diff = torch.where(p > 0, logp - logq, torch.zeros((), dtype=logp.dtype, device=logp.device))
    return p * diff


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) along V: (B, T, V) -> (B, T), float32.

    Equals logsumexp(l) - sum_x p(x) l(x), computed as -sum_x p log p from the (stable)
    log-softmax; 0 * log 0 = 0 so -inf logits are fine.
    """
    return entropy_from_logprobs(F.log_softmax(logits.float(), dim=-1))


def entropy_from_logprobs(logp: Tensor) -> Tensor:
    """Entropy from normalised log-probabilities: (B, T, V) -> (B, T); -inf entries count 0."""
    return -_p_log_ratio(logp, torch.zeros_like(logp)).sum(-1)  # (B, T)


def compute_kl_penalty(
    policy_logits: Tensor, ref_logits: Tensor, mask: Tensor | None = None
) -> Tensor:
    """Exact per-token KL(P || Q) = sum_x P(x) (log P(x) - log Q(x)): (B, T, V) x2 -> (B, T).

    P = softmax(policy_logits), Q = softmax(ref_logits), both in float32 log space. Not clamped:
    KL(p, p) is exactly 0 because log P - log Q is exactly 0. Positions with mask == 0 are 0.
    """
    logp = F.log_softmax(policy_logits.float(), dim=-1)  # (B, T, V)
    logq = F.log_softmax(ref_logits.float(), dim=-1)  # (B, T, V)
    kl = _p_log_ratio(logp, logq).sum(-1)  # (B, T)
    return kl if mask is None else _zero_masked(kl, mask)


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Sampled-token estimate of KL(policy || ref) per token: (B, R), (B, R) -> (B, R).

    Estimators from Schulman, "Approximating KL divergence" (2020), with log r = ref - policy:
    k1 = -log r (unbiased, can be negative), k2 = (log r)^2 / 2 (biased, low variance),
    k3 = (r - 1) - log r (unbiased, always >= 0).
    """
    log_r = ref_logprobs - logprobs  # (B, R)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r.pow(2)
    if estimator == "k3":
        # expm1 keeps r - 1 accurate for small log r; the clamp only removes rounding below 0.
        return (torch.expm1(log_r) - log_r).clamp(min=0)
    raise ValueError(
        f"unknown KL estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}"
    )


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
    (sum of the others = k * mean - score) without subtracting two large sums.
    """
    grouped = _grouped(scores, k, "rloo")  # (G, k)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # (G, k)
    return (centred * (k / (k - 1))).reshape(-1)  # (B,)


def group_normalised_advantages(
    scores: Tensor, k: int, scale_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO (Shao et al. 2024): (score - group mean) / (group std + eps); (B,) -> (B,).

    The std is the unbiased (Bessel-corrected, divide by k - 1) one, as in TRL's GRPOTrainer
    (`nanstd`), verl's `compute_grpo_outcome_advantage` and OpenRLHF's `group_norm` (`torch.std`);
    the paper does not say. eps = 1e-6 is verl's (TRL 1e-4): a group of equal scores gets 0.
    `scale_by_std=False` is Dr. GRPO (Liu et al. 2025): the score minus the group mean only.
    """
    grouped = _grouped(scores, k, "grpo" if scale_by_std else "dr_grpo")  # (G, k)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # (G, k)
    if scale_by_std:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)  # (G, k)
    return centred.reshape(-1)  # (B,)


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


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[returns - values] / Var[returns] over masked entries, as a 0-dim tensor.

    1 is a perfect value function, 0 is no better than a constant, negative is worse. When the
    returns have no variance the ratio is undefined and the result is nan (not 0 or -inf).
    """
    var_returns = masked_var(returns, mask)  # ()
    var_residual = masked_var(returns - values, mask)  # ()
    ev = 1.0 - var_residual / var_returns.clamp(min=torch.finfo(var_returns.dtype).tiny)  # ()
    return torch.where(var_returns > 0, ev, torch.full_like(ev, float("nan")))


# ---------------------------------------------------------------------------------------------
# Response masks
# ---------------------------------------------------------------------------------------------


def first_eos_index(response_tokens: Tensor, eos_token_id: int) -> Tensor:
    """Index of the first EOS in each row, or R where a row has none: (B, R) -> (B,) long."""
    is_eos = response_tokens == eos_token_id  # (B, R)
    no_eos = torch.full_like(is_eos[:, 0], response_tokens.shape[1], dtype=torch.long)  # (B,)
    # argmax returns the first maximal index, i.e. the first EOS when there is one.
    return torch.where(is_eos.any(dim=1), is_eos.long().argmax(dim=1), no_eos)  # (B,)


def response_mask_from_eos(
    response_tokens: Tensor, eos_token_id: int, pad_token_id: int | None = None
) -> Tensor:
    """Float mask (B, R) -> (B, R): 1 up to and including the first EOS, 0 after it.

    Lengths come only from the first EOS (ppo-details item 3), never from `token == pad`, so a
    tokenizer whose pad id equals its EOS id works. `pad_token_id` is therefore not needed; it is
    accepted so call sites can pass both ids without thinking about which one matters.
    """
    del pad_token_id  # deliberately unused: see the docstring
    last = first_eos_index(response_tokens, eos_token_id)  # (B,)
    positions = torch.arange(response_tokens.shape[1], device=response_tokens.device)  # (R,)
    return (positions[None, :] <= last[:, None]).float()  # (B, R)
