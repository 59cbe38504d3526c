"""Loading local Hugging Face model folders safely: safetensors, no hub, no remote code by default."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .errors import InputError

PAD_TOKEN = "<|pad|>"


def pick_device(requested: str = "auto") -> torch.device:
    """`auto` takes CUDA when present, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def _check_model_dir(directory: str | Path) -> Path:
    path = Path(directory)
    if not path.exists():
        raise InputError(f"{path}: model folder does not exist (models are never downloaded)")
    if not path.is_dir():
        raise InputError(f"{path}: expected a model folder, got a file")
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: no config.json; not a Hugging Face model folder")
    return path


def load_causal_lm(
    directory: str | Path, trust_remote_code: bool = False, dtype: torch.dtype | None = None
) -> nn.Module:
    """A causal LM from a local folder, weights from safetensors only, dropout off."""
    # Imported here: transformers takes a second to import and the CLI's --help should not wait.
    from transformers import AutoConfig, AutoModelForCausalLM

    path = _check_model_dir(directory)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = AutoConfig.from_pretrained(
            path, trust_remote_code=trust_remote_code, local_files_only=True
        )
    except ValueError as exc:
        raise InputError(f"{path}/config.json: {str(exc).splitlines()[0]}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            config=config,
            trust_remote_code=trust_remote_code,
            local_files_only=True,
            use_safetensors=True,
            dtype=dtype,
        )
    except ValueError as exc:
        raise InputError(
            f"{path}: not a causal language model ({str(exc).splitlines()[0]})"
        ) from None
    except OSError as exc:
        raise InputError(
            f"{path}: cannot load weights ({str(exc).splitlines()[0]}); weights must be in safetensors"
        ) from None
    model.eval()  # dropout off during RL (ppo-details 2); training loops call train() only when needed
    return model


def load_tokenizer(directory: str | Path, trust_remote_code: bool = False):
    """The tokenizer saved beside a model, with a padding token that is not EOS (ppo-details 3)."""
    from transformers import AutoTokenizer

    path = _check_model_dir(directory)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code, local_files_only=True
        )
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot load a tokenizer ({str(exc).splitlines()[0]})") from None
    return ensure_pad_token(tokenizer)


def ensure_pad_token(tokenizer):
    """Give the tokenizer a padding token distinct from EOS if it has none.

    An existing token that is not EOS (unk) is preferred because it needs no new embedding row;
    otherwise a new special token is added and callers must resize the models' embeddings
    (`match_vocab`). Masks never come from the pad id, so its embedding is never trained.
    """
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return tokenizer
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
    else:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def match_vocab(model: nn.Module, tokenizer, source: str | Path = "model") -> None:
    """Grow the embeddings for an added pad token; fail clearly when model and tokenizer differ."""
    n_embeddings = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_embeddings:
        if len(tokenizer) == n_embeddings + 1 and tokenizer.pad_token == PAD_TOKEN:
            model.resize_token_embeddings(len(tokenizer))
            return
        raise InputError(
            f"{source}: tokenizer has {len(tokenizer)} tokens but the model has only "
            f"{n_embeddings} embeddings; the tokenizer does not belong to this model"
        )


def autocast(device: torch.device):
    """bf16 autocast on CUDA; on the CPU a no-op (CPU bf16 is slower than fp32 for small models)."""
    import contextlib

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
