"""LoRA adapters through `peft`: train a few low-rank matrices instead of the whole model.

Under LoRA the frozen base weights serve three roles at once: with the policy's adapter they are
the policy, with adapters switched off they are the reference (no second copy of the model), and
with a reward adapter (and the reward head) they are the reward model, when it was trained with
LoRA on the same base. TRL's multi-adapter PPO (trl <= 0.11) did the same.

Adapters are saved in PEFT's format (`PeftModel.from_pretrained(base, folder)` loads them);
`models.policy.save_policy` can also write the adapter merged into a plain transformers model.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from ..errors import ConfigError, InputError
from ..tracking import quiet_transformers_bars
from .lora_args import LoraArgs

ADAPTER_CONFIG = "adapter_config.json"


def is_peft(model: nn.Module) -> bool:
    """Whether `model` is a PEFT wrapper (so adapters can be switched off)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def _targets(spec: str) -> str | list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    return "all-linear" if names == ["all-linear"] else names


def _uses_conv1d(lm: nn.Module) -> bool:
    """GPT-2 style layers store their weight transposed (transformers' Conv1D)."""
    return any(type(m).__name__ == "Conv1D" for m in lm.modules())


def apply_lora(
    lm: nn.Module, args: LoraArgs, adapter_name: str = "default", seed: int = 0
) -> nn.Module:
    """Wrap a causal LM with fresh, trainable LoRA adapters; the base weights are frozen.

    The adapters start as an exact no-op (B = 0), so the wrapped model computes what `lm` did.
    A's random initialisation is drawn from `seed`, leaving the global random state alone. The
    model stays in the mode `lm` was in (PEFT's `get_peft_model` switches it to training mode,
    which would turn on the base model's dropout and the adapters' in every later pass).
    """
    import torch
    from peft import get_peft_model

    config = _lora_config(lm, args)
    try:
        with torch.random.fork_rng(devices=[]), peft_quietly():
            torch.manual_seed(seed)
            return get_peft_model(lm, config, adapter_name=adapter_name).train(lm.training)
    except ValueError as exc:  # no layer matched --lora-target-modules
        layers = sorted(
            {name.rsplit(".", 1)[-1] for name, m in lm.named_modules() if isinstance(m, nn.Linear)}
            | {
                name.rsplit(".", 1)[-1]
                for name, m in lm.named_modules()
                if type(m).__name__ == "Conv1D"
            }
        )
        raise ConfigError(
            f"--lora-target-modules {args.lora_target_modules}: {str(exc).splitlines()[0]} "
            f"(this model's linear layers: {', '.join(layers[:12])}; or use all-linear)"
        ) from None


def _lora_config(lm: nn.Module, args: LoraArgs):
    from peft import LoraConfig

    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=_targets(args.lora_target_modules),
        fan_in_fan_out=_uses_conv1d(lm),
        bias="none",
        task_type="CAUSAL_LM",
    )


def add_lora(model: nn.Module, args: LoraArgs, adapter_name: str, seed: int = 0) -> nn.Module:
    """Add one more fresh adapter to a PEFT model made by `apply_lora` (same base, same layers).

    Its A matrices are drawn from `seed`, leaving the global random state alone. It records the
    same base folder as the first adapter, so that it saves as a loadable adapter too.
    """
    import torch

    config = _lora_config(model.get_base_model(), args)
    first = next(iter(model.peft_config.values()))
    config.base_model_name_or_path = first.base_model_name_or_path
    with torch.random.fork_rng(devices=[]), peft_quietly():
        torch.manual_seed(seed)
        model.add_adapter(adapter_name, config)
    return model


@contextlib.contextmanager
def peft_quietly():
    """PEFT asks the model `is_gradient_checkpointing`, which transformers 5 deprecates with a
    FutureWarning on every wrap: a warning about PEFT's code, not the user's, so not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning
        )
        yield


def adapter_base(directory: str | Path) -> Path | None:
    """The base model folder a saved adapter was trained on (from adapter_config.json), if any."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        return None
    try:
        base = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError):
        raise InputError(f"{path}: cannot read the adapter's configuration") from None
    if not base:
        raise InputError(f"{path}: no base_model_name_or_path; cannot tell which model it adapts")
    return Path(base)


def load_adapter(
    lm: nn.Module, directory: str | Path, adapter_name: str = "default", trainable: bool = False
) -> nn.Module:
    """Put the adapter saved in `directory` on `lm` (or add it to `lm` if it is already PEFT)."""
    from peft import PeftModel

    try:
        with peft_quietly():
            if is_peft(lm):
                lm.load_adapter(str(directory), adapter_name=adapter_name, is_trainable=trainable)
                return lm
            return PeftModel.from_pretrained(
                lm, str(directory), adapter_name=adapter_name, is_trainable=trainable
            )
    except Exception as exc:  # shapes or layer names of another base model
        raise InputError(
            f"{directory}: the adapter does not fit this base model ({str(exc).splitlines()[0]})"
        ) from None


@quiet_transformers_bars()  # rlhf draws its own progress
def save_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> None:
    """Write one adapter in PEFT's format (adapter_model.safetensors, adapter_config.json).

    PEFT writes the adapter of a non-default name into a sub-folder; it is written flat here, so
    that every saved adapter loads with `PeftModel.from_pretrained(base, directory)`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.peft_config[adapter_name]
    base = config.base_model_name_or_path
    if base and Path(base).is_dir():  # recorded as given when loading; make it absolute
        config.base_model_name_or_path = str(Path(base).resolve())
    model.save_pretrained(str(directory), selected_adapters=[adapter_name], safe_serialization=True)
    nested = directory / adapter_name
    if adapter_name != "default" and nested.is_dir():
        for item in nested.iterdir():
            item.replace(directory / item.name)
        nested.rmdir()


@contextlib.contextmanager
def use_adapter(model: nn.Module, name: str) -> Iterator[None]:
    """Run `model` with adapter `name` active, then switch back, trainable flags included."""
    previous = model.active_adapter
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(previous)
        for n, p in model.named_parameters():
            p.requires_grad_(trainable[n])


class AdaptersOff(nn.Module):
    """A LoRA model seen with its adapters switched off: the frozen base, as a reference model
    that costs no memory. The LoRA model is held, not registered, so its parameters are not
    counted (or moved, or frozen) twice."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self._model = [model]

    def get_base_model(self) -> nn.Module:  # lets `forward.unwrap` see the signature
        return self._model[0].get_base_model()

    def forward(self, *args, **kwargs):
        with self._model[0].disable_adapter():
            return self._model[0](*args, **kwargs)


def adapter_dropout(model: nn.Module, on: bool) -> int:
    """Switch the dropout on the adapters' input (`--lora-dropout`) on or off, leaving every
    other module in the mode it is in (the base model's own dropout stays off); returns how many
    adapter dropouts there are. PEFT keeps them in each LoRA layer's `lora_dropout`."""
    count = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict):
            for dropout in dropouts.values():
                if isinstance(dropout, nn.Dropout):
                    dropout.train(on)
                    count += 1
    return count
