"""The policy: a causal LM sharing its trunk with a scalar value head, or with a separate value
network initialised from the reward model.

Shapes: B batch, T tokens, V vocabulary, H hidden size.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..data import atomic_write
from ..errors import InputError
from ..tracking import quiet_transformers_bars
from .forward import (
    accepts_kwarg,
    device_of,
    final_hidden_states,
    float32_linear,
    hidden_size_of,
    position_ids_from_mask,
    shared_prompt_logits,
)
from .loading import check_model_dir, load_causal_lm
from .lora import adapter_base, is_peft, load_adapter, peft_quietly, save_adapter
from .reward_model import RewardModel, load_safetensors

VALUE_HEAD_FILE = "value_head.safetensors"


class PolicyWithValueHead(nn.Module):
    """A causal LM (the policy) sharing its trunk with a scalar value head.

    The value head starts at zero (ppo-details 15) so the first advantages are the raw returns.
    With `value_head=False` (the critic-free estimators) there is none and the values are None.
    """

    def __init__(self, lm: nn.Module, value_head: bool = True):
        super().__init__()
        self.lm = lm
        self.value_head = None
        if value_head:
            self.value_head = nn.Linear(hidden_size_of(lm), 1, device=device_of(lm))
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int = 0,
        prompt_length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) and values (B, T) for every position (None without a value head).

        With `logits_to_keep=K > 0` the logits cover only the last K positions, (B, K, V), where
        the model supports it (transformers' `logits_to_keep`): the LM head skips the prompt.
        With `prompt_length=P` as well and no value head, rows that share their first P tokens
        (the samples of one prompt) run those once (`shared_prompt_logits`).
        """
        if prompt_length is not None and logits_to_keep and self.value_head is None:
            logits = shared_prompt_logits(
                self.lm, input_ids, attention_mask, prompt_length, logits_to_keep
            )
            if logits is not None:
                return logits, None
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if accepts_kwarg(self.lm, "position_ids"):
            kwargs["position_ids"] = position_ids_from_mask(attention_mask)
        if logits_to_keep and accepts_kwarg(self.lm, "logits_to_keep"):
            kwargs["logits_to_keep"] = logits_to_keep
        if self.value_head is None:
            out = self.lm(**kwargs)
            values = None
        else:
            out = self.lm(**kwargs, output_hidden_states=True)
            hidden = out.hidden_states[-1]  # (B, T, H)
            values = float32_linear(self.value_head, hidden).squeeze(-1)  # (B, T), float32
        logits = out.logits if not logits_to_keep else out.logits[:, -logits_to_keep:]
        return logits, values

    def save_value_head(self, directory: str | Path) -> None:
        save_head(self.value_head.state_dict(), Path(directory) / VALUE_HEAD_FILE)

    def load_value_head(self, directory: str | Path) -> None:
        """Read the value head written by `save_value_head` (safetensors) into this policy."""
        path = Path(directory) / VALUE_HEAD_FILE
        if not path.is_file():
            raise _no_value_head(directory)
        _read_head(self.value_head, path, "the model's hidden size")


def _no_value_head(directory: str | Path) -> InputError:
    """What to say when a policy folder has no `value_head.safetensors`."""
    directory = Path(directory)
    if (directory / VALUE_MODEL_DIR / VALUE_HEAD_FILE).is_file():
        return InputError(
            f"{directory}: this policy was trained with a separate value network (--value-model "
            "reward), not a value head on its trunk: load it with load_policy(folder, "
            "value_head=False) and the critic with load_value_model(folder)"
        )
    return InputError(
        f"{directory / VALUE_HEAD_FILE}: no value head here (`rlhf ppo` writes it beside the "
        "policy; a critic-free run has none: load_policy(folder, value_head=False))"
    )


def load_policy(
    directory: str | Path,
    trust_remote_code: bool = False,
    trainable: bool = True,
    value_head: bool = True,
) -> PolicyWithValueHead:
    """A policy saved by `rlhf ppo` (its `policy/` folder): the causal LM with its value head.

    The LM alone loads with `AutoModelForCausalLM.from_pretrained`; the tokenizer beside it with
    `AutoTokenizer.from_pretrained` (or `rlhf.models.load_tokenizer`). A LoRA policy's folder holds
    its adapter: the base model it names is loaded and the adapter put on it. A critic-free run
    (rloo, grpo, dr_grpo, reinforce_pp) saves no value head: load it with `value_head=False`; nor
    does a `--value-model reward` run, whose critic `load_value_model` reads.
    """
    if value_head and not (Path(directory) / VALUE_HEAD_FILE).is_file():
        raise _no_value_head(directory)  # before any weights are read
    base_dir = adapter_base(directory)
    if base_dir is None:
        lm = load_causal_lm(directory, trust_remote_code=trust_remote_code)
    else:
        base = load_causal_lm(check_model_dir(base_dir), trust_remote_code=trust_remote_code)
        lm = load_adapter(base, directory, trainable=trainable)
    policy = PolicyWithValueHead(lm, value_head=value_head)
    if value_head:
        policy.load_value_head(directory)
    return policy


def save_policy(
    policy: PolicyWithValueHead,
    tokenizer,
    directory: str | Path,
    merged: str | Path | None = None,
    value_model: ValueModel | None = None,
) -> None:
    """Write the policy where `load_policy` reads it: its language model as `save_lm` writes it,
    and the value head beside it, or the separate value network in `value_model/`."""
    save_lm(policy.lm, tokenizer, directory, merged=merged)
    if policy.value_head is not None:
        policy.save_value_head(Path(directory))
    if value_model is not None:
        save_value_model(value_model, directory)


@quiet_transformers_bars()  # rlhf draws its own progress
def save_lm(
    lm: nn.Module, tokenizer, directory: str | Path, merged: str | Path | None = None
) -> None:
    """Write a causal LM and its tokenizer; a LoRA model as its adapter (PEFT format).

    With `merged`, a LoRA model is also written there with the adapter folded into the weights,
    as a plain transformers model: the saved adapter merged, in float32, into the base model read
    again from its folder (in memory the base may be bf16, and bf16 base + update would lose the
    base's own precision).
    """
    directory = Path(directory)
    if is_peft(lm):
        save_adapter(lm, directory)
        if merged is not None:
            base = load_causal_lm(check_model_dir(adapter_base(directory)), dtype=torch.float32)
            with peft_quietly():
                merged_lm = load_adapter(base, directory).merge_and_unload()
            merged_lm.save_pretrained(merged, safe_serialization=True)
            tokenizer.save_pretrained(merged)
    else:
        lm.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


class ValueModel(nn.Module):
    """A separate value network: a causal LM's trunk with a scalar head read at every token.

    `ValueModel.from_reward_model` starts it as a copy of the reward model's trunk and head (the
    critic TRL's PPOTrainer and OpenRLHF train), with the reward's normalisation (`reward = gain *
    head(h) + bias`) folded into the head, so at the start the value at a sequence's last token is
    the normalised reward PPO trains on, on the scale of the returns. It is saved beside the policy
    (`save_value_model`, in `policy/value_model/`) and read back with `load_value_model`.
    """

    def __init__(self, lm: nn.Module, value_head: nn.Linear):
        """Every weight trainable and float32 (the optimizer's master copy, never bf16), in eval
        mode (dropout off, ppo-details 2)."""
        super().__init__()
        self.lm = lm
        self.value_head = value_head
        self.float().eval()
        for p in self.parameters():
            p.requires_grad_(True)

    @classmethod
    def from_reward_model(cls, reward_model: RewardModel) -> ValueModel:
        """A trainable float32 copy of the reward model's trunk and normalised head (a LoRA
        reward model's adapter is merged into its copy, so the whole network is trained)."""
        lm = copy.deepcopy(reward_model.base_model)
        if is_peft(lm):
            with peft_quietly():
                lm = lm.merge_and_unload()
        head = copy.deepcopy(reward_model.reward_head).float()
        with torch.no_grad():
            gain = reward_model.reward_gain.float()
            head.weight.mul_(gain)
            head.bias.mul_(gain).add_(reward_model.reward_bias.float())
        return cls(lm, head)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = final_hidden_states(self.lm, input_ids, attention_mask)  # (B, T, H)
        return float32_linear(self.value_head, hidden).squeeze(-1)  # (B, T), float32


VALUE_MODEL_DIR = "value_model"


@quiet_transformers_bars()  # rlhf draws its own progress
def save_value_model(
    value_model: ValueModel,
    directory: str | Path,
    lm_state: dict | None = None,
    head_state: dict | None = None,
) -> None:
    """Write the trained critic into `directory/value_model/`: its trunk as a Hugging Face folder
    and its head as `value_head.safetensors`. `lm_state` and `head_state` are full state dicts
    gathered from a sharded run (else the modules' own weights are written)."""
    folder = Path(directory) / VALUE_MODEL_DIR
    value_model.lm.save_pretrained(folder, state_dict=lm_state, safe_serialization=True)
    save_head(head_state or value_model.value_head.state_dict(), folder / VALUE_HEAD_FILE)


def load_value_model(directory: str | Path, trust_remote_code: bool = False) -> ValueModel:
    """The separate critic a `--value-model reward` run saved beside its policy (float32,
    trainable): `load_value_model("runs/x/policy")`."""
    folder = Path(directory) / VALUE_MODEL_DIR
    if not (folder / VALUE_HEAD_FILE).is_file():
        kind = (
            "its value head is on the policy's trunk: load_policy(folder)"
            if (Path(directory) / VALUE_HEAD_FILE).is_file()
            else "it has no value function (a critic-free run)"
        )
        raise InputError(
            f"{folder}: no separate value model here (written by `rlhf ppo --value-model "
            f"reward`); {kind}"
        )
    lm = load_causal_lm(folder, trust_remote_code=trust_remote_code)
    head = nn.Linear(hidden_size_of(lm), 1)
    _read_head(head, folder / VALUE_HEAD_FILE, "the value model's hidden size")
    return ValueModel(lm, head)


def save_head(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write a scalar head's `weight` and `bias` (a state dict, possibly gathered from shards)
    to `path` as float32 safetensors, atomically; `_read_head` reads it."""
    tensors = {name: state[name].detach().float().contiguous().cpu() for name in ("weight", "bias")}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp))


def _read_head(head: nn.Linear, path: Path, what: str) -> None:
    """Copy a (1, H) head saved with safetensors into `head`; a shape that does not fit the model
    is an `InputError` naming the file."""
    tensors = load_safetensors(path)
    if "weight" not in tensors or "bias" not in tensors:
        raise InputError(f"{path}: not a value head (it needs 'weight' and 'bias')")
    if tensors["weight"].shape != head.weight.shape or tensors["bias"].shape != head.bias.shape:
        raise InputError(
            f"{path}: head shape {tuple(tensors['weight'].shape)} does not match {what} "
            f"{head.in_features}"
        )
    with torch.no_grad():
        head.weight.copy_(tensors["weight"])
        head.bias.copy_(tensors["bias"])
