"""rlhf: Reinforcement Learning from Human Feedback with PPO.

The public API keeps the names of the original exercise; everything else lives in its stage module
(data, models, reward, ppo, plots, hacking).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Imported on first use: torch and transformers take seconds to import, and `rlhf --help` should not.
_EXPORTS = {
    "RewardModel": "rlhf.models",
    "PolicyWithValueHead": "rlhf.models",
    "create_preference_dataset": "rlhf.preferences",
    "reward_model_loss": "rlhf.reward",
    "train_reward": "rlhf.reward",
    "RewardConfig": "rlhf.reward",
    "ppo_step": "rlhf.ppo_train",
    "train_ppo": "rlhf.ppo_train",
    "PPORunConfig": "rlhf.ppo_train",
    "PPOTrainer": "rlhf.ppo",
    "PPOConfig": "rlhf.ppo_config",
    "compute_kl_penalty": "rlhf.core",
    "plot_reward_kl_tradeoff": "rlhf.plots",
    "demonstrate_reward_hacking": "rlhf.hacking",
}

__all__ = [
    "PPOConfig",
    "PPORunConfig",
    "PPOTrainer",
    "PolicyWithValueHead",
    "RewardConfig",
    "RewardModel",
    "compute_kl_penalty",
    "create_preference_dataset",
    "demonstrate_reward_hacking",
    "plot_reward_kl_tradeoff",
    "ppo_step",
    "reward_model_loss",
    "train_ppo",
    "train_reward",
]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:
    from .core import compute_kl_penalty
    from .hacking import demonstrate_reward_hacking
    from .models import PolicyWithValueHead, RewardModel
    from .plots import plot_reward_kl_tradeoff
    from .ppo import PPOTrainer
    from .ppo_config import PPOConfig
    from .ppo_train import PPORunConfig, ppo_step, train_ppo
    from .preferences import create_preference_dataset
    from .reward import RewardConfig, reward_model_loss, train_reward


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rlhf' has no attribute {name!r}")
