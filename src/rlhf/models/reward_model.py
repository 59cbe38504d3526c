"""`RewardModel`: a scalar reward on any Hugging Face causal LM, saved and loaded with safetensors.
`score_responses` scores sampled responses from token ids, the way PPO does.

Shapes: B batch, T tokens, H hidden size, P prompt tokens (left-padded), R response tokens.

The reward is read from the final layer's hidden state at the last real token of each sequence (the
EOS when there is one), found from the attention mask so left and right padding give the same
answer (ppo-details 7).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core import response_mask_from_eos
from ..data import atomic_write, atomic_write_json
from ..errors import InputError
from ..tracking import quiet_transformers_bars
from .forward import (
    device_of,
    final_hidden_states,
    float32_linear,
    hidden_size_of,
    last_token_index,
)
from .loading import check_model_dir, load_causal_lm, load_tokenizer, match_vocab
from .lora import ADAPTER_CONFIG, adapter_base, is_peft, load_adapter, save_adapter, use_adapter

REWARD_HEAD_FILE = "reward_head.safetensors"
REWARD_CONFIG_FILE = "reward_config.json"
ENSEMBLE_FILE = "ensemble.json"
"""marks a folder of `RewardEnsemble` members (models/reward_ensemble.py)"""


class RewardModel(nn.Module):
    """A scalar reward for a whole sequence: a linear head on the last real token's hidden state.

    `reward = gain * head(h_last) + bias`, where `gain` and `bias` are set after training so that
    samples from the reference policy score mean 0 and standard deviation 1 (lm-human-preferences'
    reward normalisation, ppo-details 9). Before that they are 1 and 0.
    """

    def __init__(
        self,
        base_model: nn.Module,
        freeze_base: bool = True,
        tokenizer=None,
        adapter_name: str | None = None,
    ):
        super().__init__()
        self.base_model = base_model
        self.freeze_base = freeze_base
        self.tokenizer = tokenizer
        # A LoRA reward model can live on another model's base (the policy's): it then runs with
        # its own adapter switched on, and leaves the base's parameters to their owner.
        self.adapter_name = adapter_name
        if freeze_base and adapter_name is None:
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
        context = (
            use_adapter(self.base_model, self.adapter_name)
            if self.adapter_name is not None
            else contextlib.nullcontext()
        )
        with context:
            hidden = final_hidden_states(self.base_model, input_ids, attention_mask)  # (B, T, H)
        last = last_token_index(attention_mask)  # (B,)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        return float32_linear(self.reward_head, pooled).squeeze(-1)  # (B,), float32

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

    @property
    def is_lora(self) -> bool:
        return is_peft(self.base_model)

    @quiet_transformers_bars()  # rlhf draws its own progress
    def save_pretrained(self, directory: str | Path) -> None:
        """Write the base model (Hugging Face format), its tokenizer and the head (safetensors).

        A LoRA reward model writes only its adapter (PEFT format), which names the base model
        folder it was trained on; loading it needs that folder.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.is_lora:
            save_adapter(self.base_model, directory, self.adapter_name or "default")
        else:
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
                "lora": self.is_lora,
                "gain": float(self.reward_gain),
                "bias": float(self.reward_bias),
            },
        )

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        trust_remote_code: bool = False,
        share_base: nn.Module | None = None,
        **model_kwargs,
    ) -> RewardModel:
        """Load a reward model saved by `save_pretrained` (safetensors only, nothing from a hub).

        A LoRA reward model loads its base from the folder its adapter names. With `share_base`
        (a PEFT model of that same base, such as a LoRA policy) the adapter is added to it under
        the name "reward" instead, and no second copy of the base is made.
        """
        directory = check_reward_model_dir(directory)
        if (directory / ENSEMBLE_FILE).is_file():
            raise InputError(
                f"{directory}: holds a reward-model ensemble; load it with "
                "rlhf.models.load_reward_model (or RewardEnsemble.from_pretrained)"
            )
        try:
            config = json.loads((directory / REWARD_CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(
                f"{directory / REWARD_CONFIG_FILE}: cannot read ({type(exc).__name__})"
            ) from None
        tokenizer = load_tokenizer(directory, trust_remote_code=trust_remote_code)
        base_dir = adapter_base(directory)
        if base_dir is not None and share_base is not None:
            base = load_adapter(share_base, directory, adapter_name="reward")
            model = cls(base, tokenizer=tokenizer, adapter_name="reward")
        else:
            source = check_model_dir(base_dir) if base_dir is not None else directory
            base = load_causal_lm(source, trust_remote_code=trust_remote_code, **model_kwargs)
            match_vocab(base, tokenizer, directory)
            if base_dir is not None:
                base = load_adapter(base, directory)
            model = cls(base, freeze_base=config.get("freeze_base", True), tokenizer=tokenizer)
        model.load_head(directory / REWARD_HEAD_FILE)
        return model

    def load_head(self, path: Path) -> None:
        """Read the head, gain and bias that `save_pretrained` wrote to `path` (safetensors)."""
        head = load_safetensors(path)
        missing = {"weight", "bias", "gain", "offset"} - set(head)
        if missing:
            raise InputError(f"{path}: not a reward head (no {', '.join(sorted(missing))})")
        if head["weight"].shape != self.reward_head.weight.shape:
            raise InputError(
                f"{path}: head shape {tuple(head['weight'].shape)} does not match the base "
                f"model's hidden size {self.reward_head.in_features}"
            )
        with torch.no_grad():
            self.reward_head.weight.copy_(head["weight"])
            self.reward_head.bias.copy_(head["bias"])
            self.reward_gain.fill_(float(head["gain"]))
            self.reward_bias.fill_(float(head["offset"]))


@torch.no_grad()
def score_responses(
    reward_model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response: torch.Tensor,
    eos_token_id: int,
    pad_token_id: int,
    raw: bool = False,
) -> torch.Tensor:
    """Score of each left-padded prompt (B, P) plus its sampled response (B, R), read at the
    response's first EOS (ppo-details 7, 10); shape (B,).

    Rows that never emitted EOS get one appended: the reward model was trained on sequences that
    end in EOS (PPO's --missing-eos-penalty handles truncation explicitly). `PPOTrainer` scores its
    rollouts with this, and `train_reward` fits the normalisation on it, so "reference samples score
    mean 0, std 1" holds for the scores PPO sees. `raw=True` reads the head before normalisation.
    """
    B, P = prompt_ids.shape
    device = prompt_ids.device
    response_mask = response_mask_from_eos(response, eos_token_id).long()  # (B, R)
    lengths = response_mask.sum(1)  # (B,) up to and including the first EOS
    ended = (response == eos_token_id).any(1)  # (B,)
    ids = torch.cat(
        [prompt_ids, response, torch.full((B, 1), pad_token_id, device=device)], 1
    )  # (B, P+R+1)
    mask = torch.cat(
        [prompt_mask, response_mask, torch.zeros((B, 1), dtype=response_mask.dtype, device=device)],
        1,
    )  # (B, P+R+1)
    rows = torch.arange(B, device=device)[~ended]  # (B',)
    ids[rows, P + lengths[~ended]] = eos_token_id
    mask[rows, P + lengths[~ended]] = 1
    forward = reward_model.raw_forward if raw else reward_model
    return forward(ids, mask.to(prompt_mask.dtype)).float()  # (B,)


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # a damaged file: say which, not the reader's traceback
        raise InputError(f"{path}: cannot read ({str(exc).splitlines()[0]})") from None


def reward_model_folder(path: str | Path) -> Path:
    """The reward model in `path`: the folder itself, or the `reward_model/` inside the output
    folder of `rlhf train-reward --out` (what users naturally pass). An ensemble's folder counts."""

    def holds_one(folder: Path) -> bool:
        return (folder / REWARD_HEAD_FILE).is_file() or (folder / ENSEMBLE_FILE).is_file()

    path = Path(path)
    inner = path / "reward_model"
    if not holds_one(path) and holds_one(inner):
        return inner
    return path


def check_reward_model_dir(directory: str | Path) -> Path:
    """The folder as a Path if it holds a reward model saved by `RewardModel.save_pretrained` or
    an ensemble saved by `RewardEnsemble.save_pretrained` (its members are checked as it loads)."""
    if (Path(directory) / ENSEMBLE_FILE).is_file():
        return Path(directory)
    if not (Path(directory) / ADAPTER_CONFIG).is_file():  # a LoRA reward model has no config.json
        directory = check_model_dir(directory)
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: reward model folder does not exist")
    if not (directory / REWARD_HEAD_FILE).is_file():
        raise InputError(
            f"{directory}: not a reward model folder (no {REWARD_HEAD_FILE}); "
            "train one with `rlhf train-reward`"
        )
    return directory
