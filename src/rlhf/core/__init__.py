"""Pure tensor math for RLHF: tensor in, tensor out, no models, no I/O, no global state.

    stats       masked statistics, log-probabilities, entropy, KL estimators, response masks
    advantages  GAE, REINFORCE++ returns, RLOO / GRPO / Dr. GRPO group baselines
    losses      loss aggregation, PPO policy and value losses, Bradley-Terry, DPO / IPO
    correction  weights for rollouts sampled by another engine (vLLM), and its mismatch

Every name is importable from `rlhf.core` itself. Each function has a test with numbers worked out
by hand (tests/test_core.py, tests/test_estimators.py).
"""

from .advantages import (
    check_samples_per_prompt,
    compute_gae,
    group_normalised_advantages,
    reinforce_pp_returns,
    rloo_advantages,
)
from .correction import mismatch_metrics, rollout_correction_weights
from .losses import (
    LOSS_AGGREGATIONS,
    LossAggregation,
    aggregate_loss,
    aggregate_loss_parts,
    bradley_terry_loss,
    dpo_loss,
    loss_token_weights,
    policy_loss,
    policy_loss_per_token,
    value_loss,
    value_loss_per_token,
)
from .stats import (
    KL_ESTIMATORS,
    KLEstimator,
    compute_kl_penalty,
    entropy_from_logits,
    entropy_from_logprobs,
    explained_variance,
    first_eos_index,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    response_mask_from_eos,
)

__all__ = [
    "KLEstimator",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "LossAggregation",
    "aggregate_loss",
    "aggregate_loss_parts",
    "bradley_terry_loss",
    "check_samples_per_prompt",
    "compute_gae",
    "compute_kl_penalty",
    "dpo_loss",
    "entropy_from_logits",
    "entropy_from_logprobs",
    "explained_variance",
    "first_eos_index",
    "group_normalised_advantages",
    "kl_estimate",
    "logprobs_from_logits",
    "loss_token_weights",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "mismatch_metrics",
    "policy_loss",
    "policy_loss_per_token",
    "reinforce_pp_returns",
    "response_mask_from_eos",
    "rloo_advantages",
    "rollout_correction_weights",
    "value_loss",
    "value_loss_per_token",
]
