"""Reward modelling: preference data and Bradley-Terry training and evaluation.

preferences  `create_preference_dataset` (pairs sampled and labelled by the gold judge)
loss         `reward_model_loss`, scoring texts, held-out evaluation
config       `RewardConfig`, the options of `rlhf train-reward`
train        `train_reward` (`rlhf train-reward`; `RewardConfig` importable from here too)
shaping      `clip_rewards`, `par_rewards`: the sequence reward bounded before PPO sees it
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# Imported on first use: `rlhf train-reward --help` reads `config` and should not wait for torch.
_EXPORTS = {"clip_rewards": "shaping", "par_rewards": "shaping"}

__all__ = ["clip_rewards", "par_rewards"]

if TYPE_CHECKING:
    from .shaping import clip_rewards, par_rewards


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
