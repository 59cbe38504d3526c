"""The networks: a scalar RewardModel and a policy with a value head, on any Hugging Face causal LM.

Shapes: B batch, T tokens, V vocabulary, H hidden size.

Both read the hidden state of the model's final layer. A reward is read at the last real token of
each sequence (the EOS when there is one), found from the attention mask so left and right padding
give the same answer; position ids are rebuilt from the mask for every forward pass that is not
`generate` (ppo-details 4 and 7).
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .data import atomic_write, atomic_write_json
from .errors import InputError

REWARD_HEAD_FILE = "reward_head.safetensors"
REWARD_CONFIG_FILE = "reward_config.json"
VALUE_HEAD_FILE = "value_head.safetensors"


def device_of(model: nn.Module) -> torch.device:
    """Where the model's first parameter lives (the CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def hidden_size_of(model: nn.Module) -> int:
    """Width of the final hidden state, whatever the config calls it."""
    config = getattr(model, "config", None)
    for name in ("hidden_size", "n_embd", "d_model", "dim"):
        size = getattr(config, name, None)
        if isinstance(size, int) and size > 0:
            return size
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        return embeddings.embedding_dim
    raise ValueError(f"cannot tell the hidden size of {type(model).__name__}")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... counted over real tokens only, so left padding does not shift positions."""
    positions = attention_mask.long().cumsum(-1) - 1  # (B, T)
    return positions.clamp(min=0)  # (B, T)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding alike."""
    T = attention_mask.shape[-1]
    steps = torch.arange(T, device=attention_mask.device)  # (T,)
    return (attention_mask.long() * steps).argmax(-1)  # (B,)


def accepts_kwarg(module: nn.Module, argument: str) -> bool:
    """Whether `module.forward` takes this keyword argument."""
    try:
        return argument in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def final_hidden_states(
    lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Hidden states of the last layer (after the final norm), without computing LM logits."""
    trunk = getattr(
        lm, "base_model", lm
    )  # GPT2LMHeadModel -> GPT2Model, LlamaForCausalLM -> LlamaModel
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if accepts_kwarg(trunk, "position_ids"):
        kwargs["position_ids"] = position_ids_from_mask(attention_mask)
    out = trunk(**kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, T, H)


class RewardModel(nn.Module):
    """A scalar reward for a whole sequence: a linear head on the last real token's hidden state.

    `reward = gain * head(h_last) + bias`, where `gain` and `bias` are set after training so that
    samples from the reference policy score mean 0 and standard deviation 1 (lm-human-preferences'
    reward normalisation, ppo-details 9). Before that they are 1 and 0.
    """

    def __init__(self, base_model: nn.Module, freeze_base: bool = True, tokenizer=None):
        super().__init__()
        self.base_model = base_model
        self.freeze_base = freeze_base
        self.tokenizer = tokenizer
        if freeze_base:
            for param in self.base_model.parameters():
                param.requires_grad = False
        d = hidden_size_of(base_model)
        self.reward_head = nn.Linear(d, 1)
        # N(0, 1/sqrt(d+1)) weights and zero bias (ppo-details 8, lm-human-preferences).
        nn.init.normal_(self.reward_head.weight, std=1.0 / math.sqrt(d + 1))
        nn.init.zeros_(self.reward_head.bias)
        # Drawn on the CPU (the same numbers whatever the device), then put beside the trunk.
        device = device_of(base_model)
        self.reward_head.to(device)
        self.register_buffer("reward_gain", torch.tensor(1.0, device=device))
        self.register_buffer("reward_bias", torch.tensor(0.0, device=device))

    def raw_forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The head's output before normalisation, shape (B,)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = final_hidden_states(self.base_model, input_ids, attention_mask)  # (B, T, H)
        last = last_token_index(attention_mask)  # (B,)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        return self.reward_head(pooled.to(self.reward_head.weight.dtype)).squeeze(-1)  # (B,)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One normalised reward per sequence, shape (B,)."""
        return self.reward_gain * self.raw_forward(input_ids, attention_mask) + self.reward_bias

    @torch.no_grad()
    def set_normalisation(self, raw_scores: torch.Tensor) -> None:
        """Choose gain and bias so that these raw scores map to mean 0 and std 1."""
        mean, std = raw_scores.float().mean(), raw_scores.float().std()
        gain = 1.0 / std.clamp(min=1e-6)
        self.reward_gain.fill_(gain)
        self.reward_bias.fill_(-mean * gain)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the base model (Hugging Face format), its tokenizer and the head (safetensors)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.base_model.save_pretrained(directory, safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        head = {
            "weight": self.reward_head.weight.detach().float().contiguous().cpu(),
            "bias": self.reward_head.bias.detach().float().contiguous().cpu(),
            "gain": self.reward_gain.detach().float().reshape(1).cpu(),
            "offset": self.reward_bias.detach().float().reshape(1).cpu(),
        }
        with atomic_write(directory / REWARD_HEAD_FILE) as tmp:
            save_file(head, str(tmp))
        atomic_write_json(
            directory / REWARD_CONFIG_FILE,
            {
                "hidden_size": self.reward_head.in_features,
                "pooling": "last_token",
                "freeze_base": self.freeze_base,
                "gain": float(self.reward_gain),
                "bias": float(self.reward_bias),
            },
        )

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, trust_remote_code: bool = False, **model_kwargs
    ) -> RewardModel:
        """Load a reward model saved by `save_pretrained` (safetensors only, nothing from a hub)."""
        from .loading import load_causal_lm, load_tokenizer, match_vocab

        directory = check_reward_model_dir(directory)
        head_path = directory / REWARD_HEAD_FILE
        try:
            config = json.loads((directory / REWARD_CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(
                f"{directory / REWARD_CONFIG_FILE}: cannot read ({type(exc).__name__})"
            ) from None
        tokenizer = load_tokenizer(directory, trust_remote_code=trust_remote_code)
        base = load_causal_lm(directory, trust_remote_code=trust_remote_code, **model_kwargs)
        match_vocab(base, tokenizer, directory)
        model = cls(base, freeze_base=config.get("freeze_base", True), tokenizer=tokenizer)
        head = _load_safetensors(head_path)
        if head["weight"].shape != model.reward_head.weight.shape:
            raise InputError(
                f"{head_path}: head shape {tuple(head['weight'].shape)} does not match the base "
                f"model's hidden size {model.reward_head.in_features}"
            )
        with torch.no_grad():
            model.reward_head.weight.copy_(head["weight"])
            model.reward_head.bias.copy_(head["bias"])
            model.reward_gain.fill_(float(head["gain"]))
            model.reward_bias.fill_(float(head["offset"]))
        return model


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # a damaged file: say which, not the reader's traceback
        raise InputError(f"{path}: cannot read ({str(exc).splitlines()[0]})") from None


def check_reward_model_dir(directory: str | Path) -> Path:
    """The folder as a Path if it holds a reward model saved by `RewardModel.save_pretrained`."""
    from .loading import check_model_dir

    directory = check_model_dir(directory)
    if not (directory / REWARD_HEAD_FILE).is_file():
        raise InputError(
            f"{directory}: not a reward model folder (no {REWARD_HEAD_FILE}); "
            "train one with `rlhf train-reward`"
        )
    return directory


def swap_slow_gelu(model: nn.Module) -> int:
    """Replace transformers' `gelu_new` modules with torch's one-kernel tanh GELU; returns how many.

    GPT-2's `gelu_new` runs as separate pow, mul, add and tanh kernels; `nn.GELU("tanh")` is the
    same function (within 3e-7 in float32) in one kernel, about 10% of a PPO step on the default
    model (benchmarks/README.md). Saved weights and configs are unchanged.
    """
    try:
        from transformers.activations import NewGELUActivation
    except ImportError:  # pragma: no cover - an older or newer transformers without it
        return 0
    swapped = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, nn.GELU(approximate="tanh"))
                swapped += 1
    return swapped


class PolicyWithValueHead(nn.Module):
    """A causal LM (the policy) sharing its trunk with a scalar value head.

    The value head starts at zero (ppo-details 15) so the first advantages are the raw returns.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.value_head = nn.Linear(hidden_size_of(lm), 1, device=device_of(lm))
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, V) and values (B, T) for every position.

        With `logits_to_keep=K > 0` the logits cover only the last K positions, (B, K, V), where
        the model supports it (transformers' `logits_to_keep`): the LM head skips the prompt.
        """
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if accepts_kwarg(self.lm, "position_ids"):
            kwargs["position_ids"] = position_ids_from_mask(attention_mask)
        if logits_to_keep and accepts_kwarg(self.lm, "logits_to_keep"):
            kwargs["logits_to_keep"] = logits_to_keep
        out = self.lm(**kwargs, output_hidden_states=True)
        hidden = out.hidden_states[-1]  # (B, T, H)
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)  # (B, T)
        logits = out.logits if not logits_to_keep else out.logits[:, -logits_to_keep:]
        return logits, values

    def save_value_head(self, directory: str | Path) -> None:
        tensors = {
            "weight": self.value_head.weight.detach().float().contiguous().cpu(),
            "bias": self.value_head.bias.detach().float().contiguous().cpu(),
        }
        with atomic_write(Path(directory) / VALUE_HEAD_FILE) as tmp:
            save_file(tensors, str(tmp))

    def load_value_head(self, directory: str | Path) -> None:
        """Read the value head written by `save_value_head` (safetensors) into this policy."""
        path = Path(directory) / VALUE_HEAD_FILE
        if not path.is_file():
            raise InputError(
                f"{path}: no value head here (written by `rlhf ppo` beside the policy)"
            )
        tensors = _load_safetensors(path)
        if tensors["weight"].shape != self.value_head.weight.shape:
            raise InputError(
                f"{path}: value head shape {tuple(tensors['weight'].shape)} does not match the "
                f"model's hidden size {self.value_head.in_features}"
            )
        with torch.no_grad():
            self.value_head.weight.copy_(tensors["weight"])
            self.value_head.bias.copy_(tensors["bias"])


def load_policy(directory: str | Path, trust_remote_code: bool = False) -> PolicyWithValueHead:
    """A policy saved by `rlhf ppo` (its `policy/` folder): the causal LM with its value head.

    The LM alone loads with `AutoModelForCausalLM.from_pretrained`; the tokenizer beside it with
    `AutoTokenizer.from_pretrained` (or `rlhf.loading.load_tokenizer`).
    """
    from .loading import load_causal_lm

    policy = PolicyWithValueHead(load_causal_lm(directory, trust_remote_code=trust_remote_code))
    policy.load_value_head(directory)
    return policy
