"""Tests for the critic-free advantage estimators, loss aggregation and the DPO loss in rlhf.core.

Every expected number is worked out by hand in the comment above it; the loops are slow
references written straight from the papers' definitions.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from rlhf.core import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    aggregate_loss_parts,
    check_samples_per_prompt,
    dpo_loss,
    group_normalised_advantages,
    masked_whiten,
    reinforce_pp_returns,
    rloo_advantages,
)
from rlhf.errors import ConfigError

GARBAGE = 1e6


def close(actual: torch.Tensor, expected, atol: float = 1e-5) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-5)


# Two prompts, k = 3 samples each, in consecutive rows.
SCORES = torch.tensor([1.0, 2.0, 6.0, 3.0, 3.0, 0.0])


# ---------------------------------------------------------------------------------------------
# RLOO
# ---------------------------------------------------------------------------------------------


def test_rloo_hand_values() -> None:
    # Group [1, 2, 6]: 1 - (2 + 6) / 2 = -3, 2 - (1 + 6) / 2 = -1.5, 6 - (1 + 2) / 2 = 4.5.
    # Group [3, 3, 0]: 3 - (3 + 0) / 2 = 1.5 (twice), 0 - (3 + 3) / 2 = -3.
    close(rloo_advantages(SCORES, 3), [-3.0, -1.5, 4.5, 1.5, 1.5, -3.0])
    # k = 2: the baseline is the other sample: [1, 2] -> -1, 1; [6, 3] -> 3, -3; [3, 0] -> 3, -3.
    close(rloo_advantages(SCORES, 2), [-1.0, 1.0, 3.0, -3.0, 3.0, -3.0])


@pytest.mark.parametrize("k", [2, 3, 4])
def test_rloo_matches_leave_one_out_loop(k: int) -> None:
    scores = torch.randn(4 * k, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    values = scores.tolist()
    expected = []
    for i, s in enumerate(values):
        start = i - i % k
        others = [values[j] for j in range(start, start + k) if j != i]
        expected.append(s - sum(others) / len(others))
    close(rloo_advantages(scores, k), expected, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# GRPO and Dr. GRPO
# ---------------------------------------------------------------------------------------------


def test_grpo_hand_values_use_the_unbiased_std() -> None:
    # Group [1, 2, 6]: mean 3, deviations -2, -1, 3, squares sum to 14, unbiased var 14 / 2 = 7,
    #   std sqrt(7) = 2.6457513 -> -0.7559289, -0.3779645, 1.1338934.
    #   (The biased std sqrt(14 / 3) = 2.1602469 would give -0.9258201 for the first.)
    # Group [3, 3, 0]: mean 2, deviations 1, 1, -2, squares 6, var 3, std 1.7320508
    #   -> 0.5773503, 0.5773503, -1.1547005.
    close(
        group_normalised_advantages(SCORES, 3),
        [-0.7559289, -0.3779645, 1.1338934, 0.5773503, 0.5773503, -1.1547005],
    )


def test_dr_grpo_only_subtracts_the_group_mean() -> None:
    # Deviations from the group means 3 and 2, not scaled.
    close(
        group_normalised_advantages(SCORES, 3, scale_by_std=False),
        [-2.0, -1.0, 3.0, 1.0, 1.0, -2.0],
    )


def test_grpo_group_of_equal_scores_gets_zero_not_nan() -> None:
    adv = group_normalised_advantages(torch.tensor([5.0, 5.0, 1.0, 3.0]), 2)
    # [5, 5]: 0 / (0 + eps) = 0; [1, 3]: mean 2, unbiased std sqrt(2) -> -0.7071068, 0.7071068.
    close(adv, [0.0, 0.0, -0.7071068, 0.7071068])


def test_grpo_matches_statistics_module_loop() -> None:
    k = 4
    scores = torch.randn(5 * k, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    values = scores.tolist()
    expected = []
    for i, s in enumerate(values):
        group = values[i - i % k : i - i % k + k]
        expected.append((s - statistics.mean(group)) / (statistics.stdev(group) + 1e-6))
    close(group_normalised_advantages(scores, k), expected, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# k: samples per prompt
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "estimator",
    [
        lambda s, k: rloo_advantages(s, k),
        lambda s, k: group_normalised_advantages(s, k),
        lambda s, k: group_normalised_advantages(s, k, scale_by_std=False),
    ],
    ids=["rloo", "grpo", "dr_grpo"],
)
def test_group_estimators_refuse_one_sample_per_prompt(estimator) -> None:
    with pytest.raises(ConfigError) as info:
        estimator(SCORES, 1)
    message = str(info.value)
    assert "\n" not in message
    assert "--samples-per-prompt 1" in message and "at least 2" in message
    assert "baseline" in message  # says why


def test_samples_per_prompt_must_divide_the_batch() -> None:
    with pytest.raises(ConfigError, match=r"--samples-per-prompt 4 must divide .*\(6\)"):
        rloo_advantages(SCORES, 4)
    check_samples_per_prompt(3, 6)  # fine
    check_samples_per_prompt(2)  # the row count is optional
    with pytest.raises(ConfigError, match="at least 2"):
        check_samples_per_prompt(0, 6)


# ---------------------------------------------------------------------------------------------
# REINFORCE++
# ---------------------------------------------------------------------------------------------

# Row 0: KL penalties -0.1, -0.2, -0.3 and the score 1.0 at its last token; row 1 ends after one
# token (reward 0.5), then padding holding garbage.
PP_REWARDS = torch.tensor([[-0.1, -0.2, 0.7], [0.5, GARBAGE, -GARBAGE]])
PP_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


def test_reinforce_pp_returns_hand_values() -> None:
    # gamma 1: row 0: G2 = 0.7, G1 = -0.2 + 0.7 = 0.5, G0 = -0.1 + 0.5 = 0.4; row 1: 0.5, 0, 0.
    close(reinforce_pp_returns(PP_REWARDS, PP_MASK), [[0.4, 0.5, 0.7], [0.5, 0.0, 0.0]])
    # gamma 0.5: G1 = -0.2 + 0.5 * 0.7 = 0.15, G0 = -0.1 + 0.5 * 0.15 = -0.025.
    close(
        reinforce_pp_returns(PP_REWARDS, PP_MASK, gamma=0.5), [[-0.025, 0.15, 0.7], [0.5, 0.0, 0.0]]
    )
    # Padding holding inf or nan changes nothing (0 * inf would be nan).
    for garbage in (float("inf"), float("nan")):
        rewards = PP_REWARDS.clone()
        rewards[1, 1:] = garbage
        close(reinforce_pp_returns(rewards, PP_MASK), [[0.4, 0.5, 0.7], [0.5, 0.0, 0.0]])


def test_reinforce_pp_advantage_is_the_global_whitening_of_the_returns() -> None:
    # Real returns 0.4, 0.5, 0.7, 0.5: mean 0.525, deviations -0.125, -0.025, 0.175, -0.025,
    # squares sum to 0.0475, unbiased var 0.0475 / 3 = 0.0158333, std 0.1258306.
    adv = masked_whiten(reinforce_pp_returns(PP_REWARDS, PP_MASK), PP_MASK)
    close(adv, [[-0.993399, -0.198680, 1.390759], [-0.198680, 0.0, 0.0]])


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_returns_match_slow_loop(gamma: float) -> None:
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(4, 6, generator=gen, dtype=torch.float64)  # (B, R)
    lengths = [6, 3, 1, 4]
    mask = (torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]).double()  # (B, R)
    expected = torch.zeros(4, 6, dtype=torch.float64)
    for b, n in enumerate(lengths):
        for t in range(n):
            expected[b, t] = sum(gamma ** (j - t) * rewards[b, j].item() for j in range(t, n))
    close(reinforce_pp_returns(rewards, mask, gamma), expected, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Loss aggregation
# ---------------------------------------------------------------------------------------------

# Row 0: three tokens with losses 1, 2, 3; row 1: one token, 4; row 2: a padding row.
LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, GARBAGE, -GARBAGE], [GARBAGE, GARBAGE, GARBAGE]])
LOSS_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_aggregate_loss_hand_values() -> None:
    # token-mean: (1 + 2 + 3 + 4) / 4 = 2.5.
    close(aggregate_loss(LOSS, LOSS_MASK, "token-mean"), 2.5)
    # seq-mean-token-mean: rows' means 2 and 4, over 2 rows (the padding row is not one) = 3.
    close(aggregate_loss(LOSS, LOSS_MASK, "seq-mean-token-mean"), 3.0)
    # seq-mean-token-sum-norm with norm 4: rows' sums 6 / 4 = 1.5 and 4 / 4 = 1, mean 1.25.
    close(aggregate_loss(LOSS, LOSS_MASK, "seq-mean-token-sum-norm", norm_length=4), 1.25)
    num, den = aggregate_loss_parts(LOSS, LOSS_MASK, "seq-mean-token-sum-norm", norm_length=4)
    close(num, 2.5)
    close(den, 2.0)
    close(aggregate_loss(LOSS, torch.zeros_like(LOSS_MASK), "token-mean"), 0.0)  # empty: 0


def test_aggregate_loss_needs_a_norm_length_and_a_known_mode() -> None:
    with pytest.raises(ValueError, match="norm_length"):
        aggregate_loss(LOSS, LOSS_MASK, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-mean"):
        aggregate_loss(LOSS, LOSS_MASK, "sum")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_split_batch_gives_the_same_loss_and_gradient(mode: str) -> None:
    """Numerators summed over pieces (each trimmed to its own padded width) over the summed
    denominators: the same value and gradient as the whole batch, for any split."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 2, 7, 1, 3, 0, 4])  # one padding row
    B, R = len(lengths), 7
    mask = (torch.arange(R)[None, :] < lengths[:, None]).float()  # (B, R)
    weights = torch.randn(B, R, generator=gen, dtype=torch.float64)
    param = torch.randn(B, R, generator=gen, dtype=torch.float64, requires_grad=True)
    per_token = lambda p, w: (p * w).pow(2)  # noqa: E731  a loss with a non-trivial gradient
    norm = 10

    whole = aggregate_loss(per_token(param, weights), mask, mode, norm)
    (whole_grad,) = torch.autograd.grad(whole, param)

    for cuts in ([0, 3, 7], [0, 1, 2, 5, 7], [0, 6, 7]):
        pieces = list(zip(cuts[:-1], cuts[1:]))
        width = lambda s, e: max(1, int(lengths[s:e].max()))  # noqa: E731
        denominator = sum(
            aggregate_loss_parts(
                torch.zeros(e - s, width(s, e)), mask[s:e, : width(s, e)], mode, norm
            )[1]
            for s, e in pieces
        )
        total = 0.0
        grad = torch.zeros_like(param)
        for s, e in pieces:
            w = width(s, e)
            numerator, _ = aggregate_loss_parts(
                per_token(param[s:e, :w], weights[s:e, :w]), mask[s:e, :w], mode, norm
            )
            piece_loss = numerator / denominator
            (g,) = torch.autograd.grad(piece_loss, param)
            grad += g
            total += piece_loss.item()
        close(torch.tensor(total, dtype=torch.float64), whole.item(), atol=1e-10)
        close(grad, whole_grad, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# DPO and IPO
# ---------------------------------------------------------------------------------------------

# Pair 0: chosen log-ratio -1 - (-2) = 1, rejected -3 - (-2) = -1. Pair 1: every log-prob equal.
POL_C = torch.tensor([-1.0, -5.0])
POL_R = torch.tensor([-3.0, -5.0])
REF_C = torch.tensor([-2.0, -5.0])
REF_R = torch.tensor([-2.0, -5.0])


def test_dpo_sigmoid_hand_values() -> None:
    # beta 0.5: logits 0.5 * (1 - (-1)) = 1, loss -log sigmoid(1) = log(1 + e^-1) = 0.3132617;
    # pair 1: logits 0, loss log 2 = 0.6931472. Rewards 0.5 * 1, 0.5 * -1; 0, 0.
    losses, chosen, rejected = dpo_loss(POL_C, POL_R, REF_C, REF_R, beta=0.5)
    close(losses, [0.3132617, 0.6931472])
    close(chosen, [0.5, 0.0])
    close(rejected, [-0.5, 0.0])


def test_dpo_label_smoothing_hand_values() -> None:
    # eps 0.1: 0.9 * 0.3132617 + 0.1 * -log sigmoid(-1) = 0.2819355 + 0.1 * 1.3132617 = 0.4132617;
    # pair 1: 0.9 log 2 + 0.1 log 2 = log 2.
    losses, _, _ = dpo_loss(POL_C, POL_R, REF_C, REF_R, beta=0.5, label_smoothing=0.1)
    close(losses, [0.4132617, 0.6931472])


def test_dpo_gradient_hand_value_and_detached_rewards() -> None:
    # d/d logp_chosen of -log sigmoid(beta (c - r)) = -beta sigmoid(-beta (c - r))
    # = -0.5 * sigmoid(-1) = -0.5 * 0.2689414 = -0.1344707; for the rejected it is +0.1344707.
    pol_c, pol_r = POL_C.clone().requires_grad_(True), POL_R.clone().requires_grad_(True)
    losses, chosen, rejected = dpo_loss(pol_c, pol_r, REF_C, REF_R, beta=0.5)
    losses.sum().backward()
    close(pol_c.grad, [-0.1344707, -0.25])  # pair 1: -0.5 * sigmoid(0) = -0.25
    close(pol_r.grad, [0.1344707, 0.25])
    assert not chosen.requires_grad and not rejected.requires_grad


def test_ipo_hand_values_with_and_without_length_normalisation() -> None:
    # beta 0.5 -> target margin 1 / (2 * 0.5) = 1.
    # Summed log-ratios: pair 0 (1 - (-1) - 1)^2 = 1; pair 1 (0 - 0 - 1)^2 = 1.
    losses, chosen, rejected = dpo_loss(POL_C, POL_R, REF_C, REF_R, beta=0.5, loss_type="ipo")
    close(losses, [1.0, 1.0])
    close(chosen, [0.5, 0.0])  # implicit rewards are never length-normalised
    # Per token (chosen 2 tokens, rejected 5): 1 / 2 - (-1 / 5) = 0.7 -> (0.7 - 1)^2 = 0.09.
    losses, chosen, _ = dpo_loss(
        POL_C, POL_R, REF_C, REF_R, beta=0.5, loss_type="ipo",
        chosen_lengths=torch.tensor([2.0, 3.0]), rejected_lengths=torch.tensor([5.0, 1.0]),
    )  # fmt: skip
    close(losses, [0.09, 1.0])
    close(chosen, [0.5, 0.0])


def test_dpo_rejects_unknown_loss_and_smoothing_with_ipo() -> None:
    with pytest.raises(ValueError, match="sigmoid or ipo"):
        dpo_loss(POL_C, POL_R, REF_C, REF_R, beta=0.1, loss_type="hinge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sigmoid loss only"):
        dpo_loss(POL_C, POL_R, REF_C, REF_R, beta=0.1, loss_type="ipo", label_smoothing=0.1)


def test_dpo_loss_is_finite_for_huge_margins() -> None:
    big = torch.tensor([1e4])
    losses, _, _ = dpo_loss(-big, big, torch.zeros(1), torch.zeros(1), beta=1.0)
    assert torch.isfinite(losses).all() and losses.item() > 1e3
    assert math.isclose(
        dpo_loss(big, -big, torch.zeros(1), torch.zeros(1), beta=1.0)[0].item(), 0.0, abs_tol=1e-6
    )
