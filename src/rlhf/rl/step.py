"""The seed's one-call form of PPO: `ppo_step(policy_model, reward_model, ref_model, prompts)`.

It checks what it is given (a path or a plain language model where a `RewardModel` belongs is
refused with a message that says how to load the right thing) and keeps one `PPOTrainer` per
policy, so that repeated calls continue one run.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..models.policy import PolicyWithValueHead
from ..models.reward_ensemble import RewardEnsemble
from ..models.reward_model import RewardModel
from .config import PPOConfig
from .trainer import PPOTrainer


def ppo_step(
    policy_model,
    reward_model: RewardModel,
    ref_model,
    prompts: str | Sequence[str],
    kl_coef: float = 0.1,
    tokenizer=None,
    config: PPOConfig | None = None,
) -> dict[str, float]:
    """One PPO update step, the seed's call form: sample, score, penalise KL, update; returns metrics.

    - `policy_model`: a Hugging Face causal LM (for example `AutoModelForCausalLM.from_pretrained`),
      trained in place; or a `PolicyWithValueHead`.
    - `reward_model`: a `RewardModel`, such as `RewardModel.from_pretrained(folder)` on the
      `reward_model/` folder that `rlhf train-reward` writes.
    - `ref_model`: the frozen reference, a causal LM with the policy's vocabulary. `None` means a
      frozen copy of the policy as it is at the first call (the usual choice: the SFT model).
    - `prompts`: a list of prompt strings; a single string is one prompt.
    - `tokenizer`: the policy's tokenizer; defaults to the reward model's.

    The trainer behind it (optimizer state, value head, KL controller, the reference) is kept per
    policy model, so repeated calls continue one run; the first call fixes the batch size and the
    reference. For real runs use `PPOTrainer` (or `train_ppo`) directly.
    """
    prompts = _check_ppo_step_args(policy_model, reward_model, ref_model, prompts, tokenizer)
    tokenizer = (
        tokenizer
        or getattr(reward_model, "tokenizer", None)
        or getattr(policy_model, "tokenizer", None)
    )
    if tokenizer is None:
        raise ValueError(
            "ppo_step needs the policy's tokenizer: pass tokenizer=AutoTokenizer.from_pretrained"
            "(folder); a RewardModel loaded with RewardModel.from_pretrained carries its own"
        )
    # The trainer lives on the policy object itself, so it is freed with it (a WeakKeyDictionary
    # would keep both alive: the trainer refers back to the policy).
    trainer = policy_model.__dict__.get("_rlhf_ppo_trainer")
    if trainer is None:
        config = config or PPOConfig(
            kl_coef=kl_coef, batch_size=len(prompts), minibatch_size=len(prompts), steps=1_000_000
        )
        if ref_model is None:
            lm = policy_model.lm if isinstance(policy_model, PolicyWithValueHead) else policy_model
            ref_model = copy.deepcopy(lm)  # frozen by the trainer
        trainer = PPOTrainer(policy_model, ref_model, reward_model, tokenizer, config)
        policy_model.__dict__["_rlhf_ppo_trainer"] = trainer
    trainer.kl_ctl.value = kl_coef if not trainer.config.adaptive_kl else trainer.kl_ctl.value
    with torch.enable_grad():
        return trainer.step(prompts)


_LOAD_LM = "load one with AutoModelForCausalLM.from_pretrained(folder)"
_LOAD_RM = (
    "load one with RewardModel.from_pretrained(folder), the reward_model/ folder that "
    "`rlhf train-reward` writes"
)


def _check_ppo_step_args(policy_model, reward_model, ref_model, prompts, tokenizer) -> list[str]:
    """Refuse arguments of the wrong kind with a message naming the expected class; returns the
    prompts as a list (a single string is one prompt, not a sequence of one-letter prompts)."""
    for name, model in (("policy_model", policy_model), ("ref_model", ref_model)):
        if model is None and name == "ref_model":
            continue
        if isinstance(model, (str, os.PathLike)):
            raise TypeError(f"ppo_step: {name} is a path ({str(model)!r}), not a model; {_LOAD_LM}")
        if isinstance(model, RewardModel):
            raise TypeError(
                f"ppo_step: {name} is a RewardModel; it must be a causal language model "
                "(the reward model is the second argument)"
            )
        lm = model.lm if isinstance(model, PolicyWithValueHead) else model
        if not isinstance(lm, nn.Module) or not hasattr(lm, "get_input_embeddings"):
            raise TypeError(
                f"ppo_step: {name} must be a Hugging Face causal language model "
                f"(a transformers PreTrainedModel), got {type(model).__name__}; {_LOAD_LM}"
            )
    if isinstance(reward_model, (str, os.PathLike)):
        raise TypeError(
            f"ppo_step: reward_model is a path ({str(reward_model)!r}), not a model; {_LOAD_RM}"
        )
    if not isinstance(reward_model, (RewardModel, RewardEnsemble)):
        raise TypeError(
            f"ppo_step: reward_model must be an rlhf RewardModel (a scalar head on a language "
            f"model), got {type(reward_model).__name__}; {_LOAD_RM}"
        )
    if isinstance(tokenizer, (str, os.PathLike)):
        raise TypeError(
            f"ppo_step: tokenizer is a path ({str(tokenizer)!r}); load it with "
            "AutoTokenizer.from_pretrained(folder)"
        )
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Iterable) or isinstance(prompts, (bytes, dict)):
        raise TypeError(
            f"ppo_step: prompts must be a list of strings (or one string), got {type(prompts).__name__}"
        )
    prompts = list(prompts)
    bad = next((p for p in prompts if not isinstance(p, str)), None)
    if bad is not None:
        raise TypeError(
            f"ppo_step: prompts must be strings, got a {type(bad).__name__} ({bad!r:.40})"
        )
    if not prompts:
        raise ValueError("ppo_step: prompts is empty; pass at least one prompt string")
    return prompts
