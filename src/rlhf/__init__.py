"""rlhf: Reinforcement Learning from Human Feedback with PPO.

The public API keeps the names of the original exercise; everything else lives in its stage's wing:
`rlhf.models`, `rlhf.reward`, `rlhf.rl`, `rlhf.analysis`, `rlhf.task` (see each wing's docstring).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Imported on first use: torch and transformers take seconds to import, and `rlhf --help` should not.
_EXPORTS = {
    "RewardModel": "rlhf.models.reward_model",
    "RewardEnsemble": "rlhf.models.reward_ensemble",
    "combine_rewards": "rlhf.models.reward_ensemble",
    "PolicyWithValueHead": "rlhf.models.policy",
    "create_preference_dataset": "rlhf.reward.preferences",
    "reward_model_loss": "rlhf.reward.loss",
    "train_reward": "rlhf.reward.train",
    "RewardConfig": "rlhf.reward.config",
    "ppo_step": "rlhf.rl.step",
    "train_ppo": "rlhf.rl.run",
    "PPORunConfig": "rlhf.rl.config",
    "PPOTrainer": "rlhf.rl.trainer",
    "PPOConfig": "rlhf.rl.config",
    "train_dpo": "rlhf.rl.dpo",
    "DPOConfig": "rlhf.rl.dpo",
    "compute_kl_penalty": "rlhf.core",
    "plot_reward_kl_tradeoff": "rlhf.analysis.plots",
    "demonstrate_reward_hacking": "rlhf.analysis.hacking",
}

__all__ = [
    "DPOConfig",
    "PPOConfig",
    "PPORunConfig",
    "PPOTrainer",
    "PolicyWithValueHead",
    "RewardConfig",
    "RewardEnsemble",
    "RewardModel",
    "combine_rewards",
    "compute_kl_penalty",
    "create_preference_dataset",
    "demonstrate_reward_hacking",
    "plot_reward_kl_tradeoff",
    "ppo_step",
    "reward_model_loss",
    "train_dpo",
    "train_ppo",
    "train_reward",
]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:
    from .analysis.hacking import demonstrate_reward_hacking
    from .analysis.plots import plot_reward_kl_tradeoff
    from .core import compute_kl_penalty
    from .models.policy import PolicyWithValueHead
    from .models.reward_ensemble import RewardEnsemble, combine_rewards
    from .models.reward_model import RewardModel
    from .reward.config import RewardConfig
    from .reward.loss import reward_model_loss
    from .reward.preferences import create_preference_dataset
    from .reward.train import train_reward
    from .rl.config import PPOConfig, PPORunConfig
    from .rl.dpo import DPOConfig, train_dpo
    from .rl.run import train_ppo
    from .rl.step import ppo_step
    from .rl.trainer import PPOTrainer


def __dir__() -> list[str]:
    """The public names too, so that `dir(rlhf)` and tab completion show them before first use."""
    return [*sorted(__all__), "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rlhf' has no attribute {name!r}")
