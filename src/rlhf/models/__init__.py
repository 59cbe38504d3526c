"""Models: loading local Hugging Face folders safely, the reward model, the policy with its value
head, forward passes and sampling.

    loading       local folders only, safetensors only, no remote code unless asked
    forward       position ids, final hidden states, autocast: any causal LM
    generation    batched KV-cache sampling at the training temperature; prompt encoding
    reward_model  `RewardModel`
    policy        `PolicyWithValueHead`, `ValueModel`, `load_policy`, `load_value_model`
"""

from .loading import load_causal_lm, load_tokenizer
from .policy import PolicyWithValueHead, ValueModel, load_policy, load_value_model
from .reward_model import RewardModel

__all__ = [
    "PolicyWithValueHead",
    "RewardModel",
    "ValueModel",
    "load_causal_lm",
    "load_policy",
    "load_tokenizer",
    "load_value_model",
]
