"""Forward passes through any Hugging Face causal LM: devices, position ids, final hidden states.

Shapes: B batch, T tokens, H hidden size.

Position ids are rebuilt from the attention mask for every forward pass that is not generation, so
left padding does not shift positions (ppo-details 4).
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn


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


def autocast(device: torch.device):
    """bf16 autocast on CUDA; on the CPU a no-op (CPU bf16 is slower than fp32 for small models)."""

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
