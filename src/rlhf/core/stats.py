"""Masked statistics, log-probabilities, entropy, KL estimators and response masks.

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
