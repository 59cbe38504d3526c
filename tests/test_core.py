"""Tests for rlhf.core: hand-worked numbers, reference implementations and invariances."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from rlhf.core import (
    KL_ESTIMATORS,
    bradley_terry_loss,
    compute_gae,
    compute_kl_penalty,
    entropy_from_logits,
    explained_variance,
    first_eos_index,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    response_mask_from_eos,
    value_loss,
)

GARBAGE = 1e6


def close(actual: torch.Tensor, expected, atol: float = 1e-5) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------

# Real entries 1, 2, 3 | 4; padded slots hold garbage.
X = torch.tensor([[1.0, 2.0, 3.0], [4.0, GARBAGE, -GARBAGE]])
M = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


def test_masked_mean_hand_values() -> None:
    close(masked_mean(X, M), 2.5)  # (1 + 2 + 3 + 4) / 4
    close(masked_mean(X, M, dim=1), [2.0, 4.0])  # rows: 6 / 3, 4 / 1
    close(masked_mean(X, M, dim=0), [2.5, 2.0, 3.0])  # columns: 5 / 2, 2 / 1, 3 / 1


def test_masked_mean_ignores_padding_even_inf_and_nan() -> None:
    for garbage in (float("inf"), float("nan"), -7.0):
        x = X.clone()
        x[1, 1:] = garbage
        close(masked_mean(x, M), 2.5)
        close(masked_mean(x, M.bool(), dim=1), [2.0, 4.0])  # bool masks work too


def test_masked_mean_empty_row_is_zero() -> None:
    mask = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    close(masked_mean(X, mask, dim=1), [2.0, 0.0])


def test_masked_var_hand_values() -> None:
    # Deviations from 2.5: -1.5, -0.5, 0.5, 1.5 -> squares sum to 2.25 + 0.25 + 0.25 + 2.25 = 5.
    close(masked_var(X, M), 5.0 / 3.0)  # unbiased: 5 / (4 - 1)
    close(masked_var(X, M, unbiased=False), 1.25)  # biased: 5 / 4
    # A single real entry: no Bessel correction (count - 1 = 0), variance 0.
    close(masked_var(X, torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])), 0.0)


def test_masked_whiten_hand_values() -> None:
    # (x - 2.5) / sqrt(5/3): sqrt(5/3) = 1.290994 -> 1.5 / 1.290994 = 1.161895, 0.5 / ... = 0.387298.
    a, b = 1.161895, 0.387298
    close(masked_whiten(X, M), [[-a, -b, b], [a, 0.0, 0.0]])
    # shift_mean=False adds the mean 2.5 back on real tokens; padding stays 0.
    close(masked_whiten(X, M, shift_mean=False), [[2.5 - a, 2.5 - b, 2.5 + b], [2.5 + a, 0.0, 0.0]])


def test_masked_whiten_gives_zero_mean_unit_variance() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, generator=gen) * 3 + 5  # (B, R)
    mask = (torch.arange(9)[None, :] < torch.tensor([[9], [4], [1], [6]])).float()  # (B, R)
    w = masked_whiten(x, mask)
    close(masked_mean(w, mask), 0.0)
    close(masked_var(w, mask), 1.0, atol=1e-4)
    assert torch.all(w[mask == 0] == 0)


# ---------------------------------------------------------------------------------------------
# Log-probabilities, entropy, exact KL
# ---------------------------------------------------------------------------------------------


def _random_logits(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_logprobs_match_categorical() -> None:
    logits = _random_logits(2, 3, 7)  # (B, T, V)
    tokens = torch.randint(0, 7, (2, 3), generator=torch.Generator().manual_seed(1))  # (B, T)
    close(logprobs_from_logits(logits, tokens), Categorical(logits=logits).log_prob(tokens))


def test_logprobs_of_bf16_logits_are_float32() -> None:
    logits = _random_logits(2, 3, 7).bfloat16()
    tokens = torch.randint(0, 7, (2, 3), generator=torch.Generator().manual_seed(1))
    out = logprobs_from_logits(logits, tokens)
    assert out.dtype == torch.float32
    expected = torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None])[..., 0]
    close(out, expected)


def test_entropy_matches_categorical_and_handles_minus_inf() -> None:
    logits = _random_logits(2, 3, 7)
    close(entropy_from_logits(logits), Categorical(logits=logits).entropy())
    # Two equally likely tokens and one impossible one: H = log 2 = 0.693147.
    close(entropy_from_logits(torch.tensor([[[0.0, 0.0, -math.inf]]])), [[math.log(2)]])
    # Extreme logits: a near-certain distribution has entropy ~0, not nan.
    assert torch.isfinite(entropy_from_logits(torch.tensor([[[1e4, -1e4, 0.0]]]))).all()


def test_exact_kl_hand_value() -> None:
    # P = [0.5, 0.5], Q = [0.25, 0.75]:
    # KL = 0.5 log(0.5 / 0.25) + 0.5 log(0.5 / 0.75) = 0.5 (0.693147 - 0.405465) = 0.143841.
    p = torch.log(torch.tensor([[[0.5, 0.5]]]))
    q = torch.log(torch.tensor([[[0.25, 0.75]]]))
    close(compute_kl_penalty(p, q), [[0.143841]])


def test_exact_kl_of_distribution_with_itself_is_exactly_zero() -> None:
    logits = _random_logits(3, 5, 11, scale=10.0)
    assert torch.equal(compute_kl_penalty(logits, logits), torch.zeros(3, 5))


def test_exact_kl_matches_torch_distributions() -> None:
    p, q = _random_logits(3, 4, 9, seed=0), _random_logits(3, 4, 9, seed=1)
    expected = kl_divergence(Categorical(logits=p), Categorical(logits=q))
    close(compute_kl_penalty(p, q), expected)


def test_exact_kl_is_finite_for_extreme_logits() -> None:
    gen = torch.Generator().manual_seed(0)
    p = torch.randint(0, 2, (2, 3, 6), generator=gen).float() * 2e4 - 1e4  # logits +-1e4
    q = torch.randint(0, 2, (2, 3, 6), generator=gen).float() * 2e4 - 1e4
    p.requires_grad_(True)
    kl = compute_kl_penalty(p, q)
    assert torch.isfinite(kl).all() and (kl >= -1e-4).all()
    kl.sum().backward()
    assert torch.isfinite(p.grad).all()


def test_exact_kl_with_minus_inf_policy_logits() -> None:
    # P = [1, 0] (second logit -inf), Q = [0.5, 0.5]: KL = 1 * log(1 / 0.5) = log 2; 0 log 0 = 0.
    p = torch.tensor([[[0.0, -math.inf]]], requires_grad=True)
    q = torch.tensor([[[0.0, 0.0]]])
    kl = compute_kl_penalty(p, q)
    close(kl, [[math.log(2)]])
    kl.sum().backward()
    assert torch.isfinite(p.grad).all()
    # Both distributions putting 0 on the same token: still finite (-inf - -inf is never used).
    close(compute_kl_penalty(p.detach(), torch.tensor([[[0.0, -math.inf]]])), [[0.0]])


def test_exact_kl_masked_positions_are_zero() -> None:
    p, q = _random_logits(2, 3, 5, seed=0), _random_logits(2, 3, 5, seed=1)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    kl = compute_kl_penalty(p, q, mask)
    assert torch.all(kl[mask == 0] == 0)
    close(kl[mask == 1], compute_kl_penalty(p, q)[mask == 1])
    assert (kl[mask == 1] > 0).all()


# ---------------------------------------------------------------------------------------------
# Sampled KL estimators
# ---------------------------------------------------------------------------------------------


def test_kl_estimators_hand_values() -> None:
    # Token 1: policy log 0.5, ref log 0.25 -> log r = log 0.5 = -0.693147, r = 0.5:
    #   k1 = 0.693147, k2 = 0.5 * 0.693147^2 = 0.240227, k3 = (0.5 - 1) + 0.693147 = 0.193147.
    # Token 2: equal log-probs -> log r = 0 -> every estimator is 0.
    logprobs = torch.tensor([[math.log(0.5), -1.0]])
    ref = torch.tensor([[math.log(0.25), -1.0]])
    close(kl_estimate(logprobs, ref), [[0.693147, 0.0]])  # default is k1
    close(kl_estimate(logprobs, ref, "k2"), [[0.240227, 0.0]])
    close(kl_estimate(logprobs, ref, "k3"), [[0.193147, 0.0]])
    # k1 is negative when the reference likes the token more; k2 and k3 are not.
    assert kl_estimate(ref, logprobs, "k1")[0, 0] < 0
    assert KL_ESTIMATORS == ("k1", "k2", "k3")


def test_unknown_kl_estimator_names_the_choices() -> None:
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(torch.zeros(1, 1), torch.zeros(1, 1), "k4")  # type: ignore[arg-type]


# k3 = (r - 1) - log r with log r = ref - policy, worked out by hand (e^x from tables):
K3_BY_HAND = [
    # (policy log-prob, reference log-prob, k3)
    (-0.5, -0.5, 0.0),  # equal: r = 1
    (math.log(0.25), math.log(0.5), 0.306853),  # r = 2: 1 - 0.693147
    (-1.0, -4.0, 2.049787),  # log r = -3: e^-3 - 1 + 3 = 0.049787 + 2
    (-10.0, 0.0, 22015.465795),  # log r = 10: e^10 - 11 = 22026.465795 - 11
    (-1e-4, 0.0, 5.000167e-9),  # log r = 1e-4: x^2/2 + x^3/6 (needs expm1, not exp - 1)
    (0.0, -1e-4, 4.999833e-9),  # log r = -1e-4: x^2/2 + x^3/6 with x < 0
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_k3_values_by_hand(dtype: torch.dtype) -> None:
    policy = torch.tensor([[p for p, _, _ in K3_BY_HAND]], dtype=dtype)  # (1, 6)
    ref = torch.tensor([[q for _, q, _ in K3_BY_HAND]], dtype=dtype)  # (1, 6)
    expected = torch.tensor([[k for _, _, k in K3_BY_HAND]], dtype=dtype)  # (1, 6)
    k3 = kl_estimate(policy, ref, "k3")
    # Relative error, as the values span 5e-9 to 2e4; the hand values have 6-7 digits. In float32
    # expm1(x) - x at x = 1e-4 comes within 4e-4 of 5e-9, while exp(x) - 1 - x is off by 230%.
    rtol = 2e-3 if dtype == torch.float32 else 1e-6
    torch.testing.assert_close(k3, expected, rtol=rtol, atol=0)


def test_k1_and_k3_means_approximate_exact_kl() -> None:
    # Monte Carlo: sample tokens from P; E_P[k1] = E_P[k3] = KL(P || Q).
    gen = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(6, generator=gen), torch.randn(6, generator=gen)  # (V,)
    exact = compute_kl_penalty(p_logits[None, None], q_logits[None, None])[0, 0]
    tokens = torch.multinomial(p_logits.softmax(-1), 200_000, replacement=True, generator=gen)
    logp = torch.log_softmax(p_logits, -1)[tokens][None]  # (1, N)
    logq = torch.log_softmax(q_logits, -1)[tokens][None]  # (1, N)
    for estimator in ("k1", "k3"):
        close(kl_estimate(logp, logq, estimator).mean(), exact.item(), atol=0.02)


# ---------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------


def gae_reference(
    rewards: list[list[float]],
    values: list[list[float]],
    lengths: list[int],
    gamma: float,
    lam: float,
) -> list[list[float]]:
    """Slow GAE: Python loops over batch and time, each sequence cut at its own length."""
    out = []
    for r, v, n in zip(rewards, values, lengths, strict=True):
        adv = [0.0] * len(r)
        last = 0.0
        for t in reversed(range(n)):
            next_value = v[t + 1] if t + 1 < n else 0.0
            delta = r[t] + gamma * next_value - v[t]
            last = delta + gamma * lam * last
            adv[t] = last
        out.append(adv)
    return out


def test_gae_hand_example() -> None:
    # rewards [0, 0, 1], values [0.5, 0.2, 0.1], gamma 1, lam 0.95, bootstrap V_3 = 0:
    #   delta_2 = 1 + 0   - 0.1 =  0.9    A_2 = 0.9
    #   delta_1 = 0 + 0.1 - 0.2 = -0.1    A_1 = -0.1 + 0.95 * 0.9   = 0.755
    #   delta_0 = 0 + 0.2 - 0.5 = -0.3    A_0 = -0.3 + 0.95 * 0.755 = 0.41725
    # returns = A + V = [0.91725, 0.955, 1.0]
    # A fourth, padded column holds garbage and must change nothing.
    rewards = torch.tensor([[0.0, 0.0, 1.0, GARBAGE]])
    values = torch.tensor([[0.5, 0.2, 0.1, -GARBAGE]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=0.95)
    close(adv, [[0.41725, 0.755, 0.9, 0.0]])
    close(ret, [[0.91725, 0.955, 1.0, 0.0]])


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (1.0, 0.0)])
def test_gae_matches_slow_loop(gamma: float, lam: float) -> None:
    gen = torch.Generator().manual_seed(int(gamma * 100 + lam * 10))
    b, r = 6, 9
    lengths = torch.randint(1, r + 1, (b,), generator=gen).tolist()
    lengths[0], lengths[1] = 0, r  # an all-padding row and a full row
    rewards = torch.randn(b, r, generator=gen, dtype=torch.float64)  # (B, R)
    values = torch.randn(b, r, generator=gen, dtype=torch.float64)  # (B, R)
    mask = (torch.arange(r)[None, :] < torch.tensor(lengths)[:, None]).double()  # (B, R)
    adv, ret = compute_gae(rewards, values, mask, gamma=gamma, lam=lam)
    expected = torch.tensor(gae_reference(rewards.tolist(), values.tolist(), lengths, gamma, lam))
    torch.testing.assert_close(adv, expected.double())
    torch.testing.assert_close(ret, (expected + values * mask).double())
    assert torch.all(adv[mask == 0] == 0) and torch.all(ret[mask == 0] == 0)


def test_gae_extra_padding_columns_change_nothing() -> None:
    gen = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    mask = (torch.arange(5)[None, :] < torch.tensor([[5], [3], [1], [4]])).float()  # (B, R)
    adv, ret = compute_gae(rewards, values, mask)
    pad = torch.full((4, 3), GARBAGE)  # (B, 3) extra padded columns
    adv2, ret2 = compute_gae(
        torch.cat([rewards, pad], 1), torch.cat([values, -pad], 1), torch.cat([mask, 0 * pad], 1)
    )
    close(adv2[:, :5], adv)
    close(ret2[:, :5], ret)
    assert torch.all(adv2[:, 5:] == 0)


# ---------------------------------------------------------------------------------------------
# PPO losses
# ---------------------------------------------------------------------------------------------

# Four real tokens (old log-prob -1 everywhere), eps = 0.2:
#   tok  log-ratio  ratio     A   -A*ratio   -A*clip(ratio)   max        clipped?
#   1     0.1       1.105171  +1  -1.105171  -1.105171        -1.105171  no (inside range)
#   2     0.5       1.648721  +1  -1.648721  -1.2             -1.2       yes
#   3     0.5       1.648721  -1   1.648721   1.2              1.648721  no
#   4    -0.5       0.606531  -1   0.606531   0.8              0.8       yes
# loss = (-1.105171 - 1.2 + 1.648721 + 0.8) / 4 = 0.035888; clipfrac = 2/4 = 0.5
# ratio = (1.105171 + 1.648721 * 2 + 0.606531) / 4 = 1.252286
# approxkl = 0.5 * (0.01 + 0.25 + 0.25 + 0.25) / 4 = 0.095
# d loss / d logp = -A * ratio / 4 where not clipped, 0 where clipped.
PG_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
PG_OLD = torch.full((2, 3), -1.0)
PG_LOGP = torch.tensor([[-0.9, -0.5, -0.5], [-1.5, -1.0, -1.0]])
PG_ADV = torch.tensor([[1.0, 1.0, -1.0], [-1.0, 0.0, 0.0]])


def _pg(logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor):
    logp = logp.clone().requires_grad_(True)
    loss, stats = policy_loss(logp, old, adv, PG_MASK, clip_eps=0.2)
    loss.backward()
    return loss, stats, logp.grad


def test_policy_loss_hand_values() -> None:
    loss, stats, grad = _pg(PG_LOGP, PG_OLD, PG_ADV)
    close(loss, 0.035888)
    close(stats["clipfrac"], 0.5)
    close(stats["ratio"], 1.252286)
    close(stats["approxkl"], 0.095)
    close(grad, [[-1.105171 / 4, 0.0, 1.648721 / 4], [0.0, 0.0, 0.0]])
    assert all(not s.requires_grad and s.dim() == 0 for s in stats.values())


def test_policy_loss_ignores_padded_tokens() -> None:
    logp, old, adv = PG_LOGP.clone(), PG_OLD.clone(), PG_ADV.clone()
    logp[1, 1:], old[1, 1:], adv[1, 1:] = GARBAGE, -GARBAGE, float("inf")
    loss, stats, grad = _pg(logp, old, adv)
    ref_loss, ref_stats, ref_grad = _pg(PG_LOGP, PG_OLD, PG_ADV)
    close(loss, ref_loss.item())
    for key in ref_stats:
        close(stats[key], ref_stats[key].item())
    close(grad, ref_grad)  # finite, and exactly 0 on padding


# Value loss, eps = 0.2:
#   tok  V    old  R    V_clip  (V-R)^2  (V_clip-R)^2  max   clipped wins?
#   1    1.0  0.9  1.5  1.0     0.25     0.25          0.25  no (tie)
#   2    2.0  1.0  0.0  1.2     4.0      1.44          4.0   no
#   3    2.0  1.0  3.0  1.2     1.0      3.24          3.24  yes
#   4    0.0  0.5  0.4  0.3     0.16     0.01          0.16  no
# loss = 0.5 * (0.25 + 4.0 + 3.24 + 0.16) / 4 = 0.5 * 1.9125 = 0.95625; vf_clipfrac = 0.25
# Gradient d loss / dV = 0.5 * 2 (V - R) / 4 where unclipped wins: tok1 -0.125, tok2 0.5,
# tok4 -0.1; tok3's winner is the clipped value, flat in V -> 0.
def test_value_loss_hand_values_and_padding() -> None:
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    values = torch.tensor([[1.0, 2.0, 2.0, 0.0, GARBAGE]], requires_grad=True)
    old = torch.tensor([[0.9, 1.0, 1.0, 0.5, -GARBAGE]])
    returns = torch.tensor([[1.5, 0.0, 3.0, 0.4, float("nan")]])
    loss, stats = value_loss(values, old, returns, mask, clip_eps=0.2)
    close(loss, 0.95625)
    close(stats["vf_clipfrac"], 0.25)
    loss.backward()
    close(values.grad, [[-0.125, 0.5, 0.0, -0.1, 0.0]])


def test_bradley_terry_hand_values() -> None:
    # -log sigmoid(0) = log 2 = 0.693147; -log sigmoid(1) = log(1 + e^-1) = 0.313262.
    close(bradley_terry_loss(torch.tensor([0.5]), torch.tensor([0.5])), 0.693147)
    close(bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0])), 0.313262)
    close(
        bradley_terry_loss(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0])),
        (0.313262 + 0.693147) / 2,
    )
    # Margin: diff 2 - margin 1 = 1 -> 0.313262; per-pair margins [1, 2] on diffs [2, 2] -> [1, 0].
    close(bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0]), margin=1.0), 0.313262)
    margin = torch.tensor([1.0, 2.0])
    close(
        bradley_terry_loss(torch.tensor([2.0, 2.0]), torch.tensor([0.0, 0.0]), margin),
        (0.313262 + 0.693147) / 2,
    )


def test_bradley_terry_is_stable_for_large_differences() -> None:
    # -log sigmoid(1000) ~ e^-1000 = 0; -log sigmoid(-1000) = 1000 -> mean 500.
    chosen = torch.tensor([1000.0, -1000.0], requires_grad=True)
    loss = bradley_terry_loss(chosen, torch.zeros(2))
    close(loss, 500.0)
    loss.backward()
    close(chosen.grad, [0.0, -0.5])  # d/dx -log sigmoid(x) = -sigmoid(-x); / 2 for the mean


# ---------------------------------------------------------------------------------------------
# Explained variance
# ---------------------------------------------------------------------------------------------


def test_explained_variance_hand_values() -> None:
    # returns [1, 2, 3, 4], values [1, 2, 3, 3] -> residual [0, 0, 0, 1].
    # Biased variances: Var[residual] = 0.1875, Var[returns] = 1.25 (ratio is the same unbiased).
    # EV = 1 - 0.1875 / 1.25 = 0.85. The padded fifth slot holds garbage.
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, GARBAGE]])
    values = torch.tensor([[1.0, 2.0, 3.0, 3.0, -GARBAGE]])
    close(explained_variance(values, returns, mask), 0.85)
    close(explained_variance(returns, returns, mask), 1.0)  # perfect value function
    close(explained_variance(torch.zeros_like(returns), returns, mask), 0.0)  # a constant guess


def test_explained_variance_of_constant_returns_is_nan() -> None:
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    ev = explained_variance(torch.tensor([[0.0, 1.0, 5.0]]), torch.tensor([[2.0, 2.0, 9.0]]), mask)
    assert ev.dim() == 0 and torch.isnan(ev)


# ---------------------------------------------------------------------------------------------
# Response masks
# ---------------------------------------------------------------------------------------------


def test_response_mask_from_eos_cases() -> None:
    eos, pad = 2, 0
    tokens = torch.tensor(
        [
            [5, 2, 0, 0],  # EOS in the middle, padded after
            [5, 6, 7, 8],  # no EOS: the whole response counts
            [2, 0, 0, 0],  # EOS first: only the EOS counts
            [5, 6, 2, 2],  # a second EOS after the first is masked
            [0, 5, 2, 0],  # a pad id before EOS is a real token: lengths never come from pad
        ]
    )
    expected = [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]]
    mask = response_mask_from_eos(tokens, eos, pad)
    assert mask.dtype == torch.float32
    close(mask, expected)
    close(first_eos_index(tokens, eos), [1, 4, 0, 2, 2])


def test_response_mask_when_pad_equals_eos() -> None:
    tokens = torch.tensor([[5, 2, 2, 2], [2, 2, 2, 2], [5, 6, 7, 8]])
    close(
        response_mask_from_eos(tokens, 2, pad_token_id=2),
        [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]],
    )


def test_inverse_cdf_sampler_matches_the_probabilities_and_never_picks_zero():
    from rlhf.models.generation import _sample

    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3, 0.0]).repeat(40_000, 1)  # (N, V)
    counts = torch.bincount(_sample(probs, g), minlength=5).double() / 40_000
    # Binomial standard error at p = 0.6 is 0.0025; 0.01 is four of them.
    torch.testing.assert_close(counts, probs[0].double(), atol=0.01, rtol=0)
    assert counts[1] == 0 and counts[4] == 0
    one_hot = torch.zeros(64, 1000)
    one_hot[:, 999] = 1.0  # the last token, where a rounding error would clamp
    assert torch.all(_sample(one_hot, g) == 999)
    same = _sample(probs[:8], torch.Generator().manual_seed(3))
    assert torch.equal(same, _sample(probs[:8], torch.Generator().manual_seed(3)))
