"""Loading local Hugging Face model folders safely: safetensors, no hub, no remote code by default."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, InputError
from ..tracking import quiet_transformers_bars
from .forward import swap_slow_gelu

PAD_TOKEN = "<|pad|>"


def pick_device(requested: str = "auto") -> torch.device:
    """`auto` takes CUDA when present, else the CPU; a device that is not there is a `ConfigError`."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ConfigError(
            f"--device: unknown device {requested!r}; use auto, cpu or cuda"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {requested}: no CUDA device here; use --device cpu")
    return device


def check_model_dir(directory: str | Path) -> Path:
    """The folder as a Path if it looks like a local Hugging Face model folder; else `InputError`."""
    path = Path(directory)
    if not path.exists():
        raise InputError(f"{path}: model folder does not exist (models are never downloaded)")
    if not path.is_dir():
        raise InputError(f"{path}: expected a model folder, got a file")
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: no config.json; not a Hugging Face model folder")
    return path


def position_limit(directory: str | Path) -> int | None:
    """Longest sequence the model in this folder can take, from its config.json (`n_positions` or
    `max_position_embeddings`, also inside a `text_config`); None when the config names none."""
    import json

    path = check_model_dir(directory) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read ({type(exc).__name__})") from None
    return config_position_limit(config)


def config_position_limit(config: dict) -> int | None:
    """`position_limit` of a model config given as a dict (`PretrainedConfig.to_dict()`)."""
    for section in (config, config.get("text_config") or {}):
        for key in ("n_positions", "max_position_embeddings"):
            if isinstance(section.get(key), int) and section[key] > 0:
                return section[key]
    return None


PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
    "spiece.model", "sentencepiece.bpe.model",
)  # fmt: skip


def _check_causal(model: nn.Module, path: Path) -> None:
    """Fail when the model's prediction at a position depends on later tokens (an encoder).

    Two sequences that differ only in their last token go through one at a time, so a causal
    model computes their common prefix with the same kernels and gives the same logits there.
    """
    n = model.get_input_embeddings().num_embeddings
    heads = []
    for last in (4, 5):
        ids = torch.tensor([[1, 2, 3, last]]) % n  # (1, 4)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits  # (1, 4, V)
        heads.append(logits[0, :3].float())  # (3, V)
    scale = heads[0].abs().max().item()
    if (heads[0] - heads[1]).abs().max().item() > 1e-5 * (1.0 + scale):
        raise InputError(
            f"{path}: not a causal language model ({type(model).__name__} looks at later tokens; "
            "an encoder such as BERT cannot generate text)"
        )


@quiet_transformers_bars()  # rlhf draws its own progress
def load_causal_lm(
    directory: str | Path, trust_remote_code: bool = False, dtype: torch.dtype | None = None
) -> nn.Module:
    """A causal LM from a local folder, weights from safetensors only, dropout off.

    The weights are float32 unless `dtype` says otherwise, whatever dtype the folder stores them
    in (transformers 5 would keep a bf16 checkpoint in bf16, and a trained bf16 weight loses
    small updates: AdamW's steps round away).
    """
    # Imported here: transformers takes a second to import and the CLI's --help should not wait.
    from transformers import AutoConfig, AutoModelForCausalLM

    path = check_model_dir(directory)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = AutoConfig.from_pretrained(
            path, trust_remote_code=trust_remote_code, local_files_only=True
        )
    except (OSError, ValueError) as exc:
        hint = (
            "; pass --trust-remote-code only if you trust it" if "custom code" in str(exc) else ""
        )
        raise InputError(f"{path}/config.json: {str(exc).splitlines()[0]}{hint}") from None
    pickled = [name for name in PICKLE_WEIGHTS if (path / name).is_file()]
    if pickled and not list(path.glob("*.safetensors")):
        raise InputError(
            f"{path}: weights are only in {pickled[0]} (pickle, which can run code when loaded); "
            "rlhf reads safetensors only: convert them where you trust the file, with "
            "save_pretrained(..., safe_serialization=True)"
        )
    # transformers' own warnings are turned into errors below (missing weights, an encoder), so
    # they are silenced while loading: a bad folder gives one line, not a warning and a line.
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path,
            config=config,
            trust_remote_code=trust_remote_code,
            local_files_only=True,
            use_safetensors=True,
            dtype=dtype or torch.float32,
            output_loading_info=True,
        )
    except ValueError as exc:
        raise InputError(
            f"{path}: not a causal language model ({str(exc).splitlines()[0]})"
        ) from None
    except Exception as exc:  # OSError for no file, RuntimeError for shapes, a damaged file
        raise InputError(
            f"{path}: cannot load weights ({str(exc).splitlines()[0]}); weights must be in safetensors"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info["missing_keys"]) + sorted(info["mismatched_keys"])
    if missing:
        raise InputError(
            f"{path}: the safetensors files lack {len(missing)} of the model's tensors (first: "
            f"{missing[0]}); the folder does not hold this model's weights"
        )
    model.eval()  # dropout off during RL (ppo-details 2); training loops call train() only when needed
    _check_causal(model, path)
    swap_slow_gelu(model)  # the same function in one kernel; what is saved stays gelu_new
    return model


def load_tokenizer(directory: str | Path, trust_remote_code: bool = False):
    """The tokenizer saved beside a model, with a padding token that is not EOS (ppo-details 3)."""
    from transformers import AutoTokenizer

    path = Path(directory)
    # A LoRA adapter's folder has no config.json, nor has a reward-model ensemble's.
    if not any((path / name).is_file() for name in ("adapter_config.json", "ensemble.json")):
        path = check_model_dir(directory)
    missing = InputError(
        f"{path}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...); save the "
        "tokenizer beside the model with tokenizer.save_pretrained"
    )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise missing
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code, local_files_only=True
        )
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot load a tokenizer ({str(exc).splitlines()[0]})") from None
    if not tokenizer.vocab_size:  # transformers builds an empty tokenizer from config.json alone
        raise missing
    return ensure_pad_token(tokenizer)


def set_eos_token(tokenizer, token: str, source: str | Path):
    """Make `token` (one token of the vocabulary) the tokenizer's EOS: where responses stop, what
    scoring appends, what the reward model reads its score at (`--eos-token`). Returns the
    tokenizer, with a padding token that is not the new EOS."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != token:
        pieces = tokenizer.tokenize(token)
        raise ConfigError(
            f"--eos-token {token!r} is not one token of the tokenizer in {source}"
            + (f" (it splits into {len(pieces)}: {pieces[:4]})" if len(pieces) > 1 else "")
        )
    tokenizer.eos_token = token
    return ensure_pad_token(tokenizer)


def apply_eos_option(tokenizer, eos_token: str | None, source: str | Path, chat: bool):
    """`--eos-token` applied to the tokenizer of the model in `source`; without it, on a run that
    uses the chat template (`chat`), one warning line when the template closes a reply with
    another token than EOS, since replies would then run on past the end of their turn."""
    if eos_token is not None:
        return set_eos_token(tokenizer, eos_token, source)
    marker = turn_end_token(tokenizer) if chat else None
    if marker is not None:
        print(
            f"warning: the chat template in {source} closes a reply with {marker}, but replies "
            f"stop at the tokenizer's EOS {tokenizer.eos_token} only; give --eos-token "
            f"'{marker}' (the same to train-reward, ppo and dpo)"
        )
    return tokenizer


def turn_end_token(tokenizer) -> str | None:
    """The special token the chat template closes an assistant turn with, when it is not the
    tokenizer's EOS (Gemma's <end_of_turn>, Phi-3's <|end|>): responses stop at EOS only, so such a
    model needs `--eos-token`. None without a template, or when the turn ends in EOS."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    reply = "zq"  # a text no template writes on its own
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": reply}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that refuses this conversation says nothing either way
        return None
    after = text[text.rfind(reply) + len(reply) :].lstrip()
    ids = tokenizer(after, add_special_tokens=False)["input_ids"][:1] if after else []
    if not ids or ids[0] == tokenizer.eos_token_id:
        return None
    token = tokenizer.convert_ids_to_tokens(ids[0])
    # Special, or added to the vocabulary whole (Phi-3's <|end|> is added but not "special").
    marker = ids[0] in tokenizer.all_special_ids or token in tokenizer.get_added_vocab()
    return token if marker else None


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
            model.config.pad_token_id = tokenizer.pad_token_id  # saved with the model
            return
        raise InputError(
            f"{source}: tokenizer has {len(tokenizer)} tokens but the model has only "
            f"{n_embeddings} embeddings; the tokenizer does not belong to this model"
        )
