"""Models: loading local Hugging Face folders safely, the reward model, the policy with its value
head, forward passes and sampling.

    loading       local folders only, safetensors only, no remote code unless asked
    forward       position ids, final hidden states, autocast: any causal LM
    generation    batched KV-cache sampling at the training temperature; prompt encoding
    reward_model  `RewardModel`
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
}

__all__ = [
    "PolicyWithValueHead",
    "RewardModel",
    "ValueModel",
    "load_causal_lm",
    "load_policy",
    "load_tokenizer",
    "load_value_model",
]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:
    from .loading import load_causal_lm, load_tokenizer
    from .policy import PolicyWithValueHead, ValueModel, load_policy, load_value_model
    from .reward_model import RewardModel


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
