"""Models: loading local Hugging Face folders safely, the reward model, the policy with its value
head, forward passes and sampling.

    loading       local folders only, safetensors only, no remote code unless asked
    forward       position ids, final hidden states, autocast: any causal LM
    generation    batched KV-cache sampling at the training temperature; prompt encoding
    reward_model  `RewardModel`
    reward_ensemble  `RewardEnsemble` (N LoRA members on one base), `combine_rewards`,
                  `load_reward_model` (either kind, by what the folder holds)
    policy        `PolicyWithValueHead`, `ValueModel`, `load_policy`, `load_value_model`
    lora          LoRA adapters through peft (`lora_args`: their options, without torch)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# Imported on first use, as in `rlhf/__init__.py`: the configs import `models.lora_args`, and
# `rlhf ppo --help` should not wait for torch.
_EXPORTS = {
    "PolicyWithValueHead": "policy",
    "ValueModel": "policy",
    "load_policy": "policy",
    "load_value_model": "policy",
    "load_causal_lm": "loading",
    "load_tokenizer": "loading",
    "RewardModel": "reward_model",
    "RewardEnsemble": "reward_ensemble",
    "combine_rewards": "reward_ensemble",
    "load_reward_model": "reward_ensemble",
}

__all__ = [
    "PolicyWithValueHead",
    "RewardEnsemble",
    "RewardModel",
    "ValueModel",
    "combine_rewards",
    "load_causal_lm",
    "load_policy",
    "load_reward_model",
    "load_tokenizer",
    "load_value_model",
]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:
    from .loading import load_causal_lm, load_tokenizer
    from .policy import PolicyWithValueHead, ValueModel, load_policy, load_value_model
    from .reward_ensemble import RewardEnsemble, combine_rewards, load_reward_model
    from .reward_model import RewardModel


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
