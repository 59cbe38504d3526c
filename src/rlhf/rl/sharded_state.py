"""The trained state of a sharded run (--shard): checkpoints through torch.distributed.checkpoint
(DCP), and the final policy gathered into one Hugging Face folder.

A checkpoint's `sharded/` folder holds the trained parameters and the optimizer's state, keyed
by parameter name (the `get_state_dict` APIs), each process writing its own shards. DCP re-splits
them on loading, so a checkpoint written by N processes resumes on M, or in one process without
--shard. Every process calls these functions; they are collectives.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

from torch import nn

SHARDED_DIR = "sharded"


def is_sharded(checkpoint: str | Path) -> bool:
    """Whether a checkpoint folder holds DCP shards (written with --shard)."""
    return (Path(checkpoint) / SHARDED_DIR).is_dir()


def _trained(trainer) -> nn.Module:
    return getattr(trainer.trained, "module", trainer.trained)  # a DDP wrapper's module


def _state(trainer) -> dict:
    """The trained parameters (a LoRA base or other frozen weights left out) and the optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    module = _trained(trainer)
    names = {name for name, p in module.named_parameters() if p.requires_grad}
    weights = {k: v for k, v in get_model_state_dict(module).items() if k in names}
    return {"model": weights, "optimizer": get_optimizer_state_dict(module, trainer.optimizer)}


@contextlib.contextmanager
def _one_process_is_fine():
    """DCP warns when no process group is running; one process reads and writes it on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_sharded(trainer, folder: Path) -> None:
    """Write this process's shards into `folder/sharded` (every process calls it)."""
    import torch.distributed.checkpoint as dcp

    with _one_process_is_fine():
        dcp.save(_state(trainer), checkpoint_id=str(Path(folder) / SHARDED_DIR))


def load_sharded(trainer, folder: Path) -> None:
    """Load `folder/sharded` into the trainer's models and optimizer, at any world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = _state(trainer)  # the shapes and shards to fill
    with _one_process_is_fine():
        dcp.load(state, checkpoint_id=str(Path(folder) / SHARDED_DIR))
    module = _trained(trainer)
    set_model_state_dict(module, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(module, trainer.optimizer, state["optimizer"])


def save_final_policy(trainer, tokenizer, directory: str | Path, merged=None) -> None:
    """Write the trained policy once, by rank 0, where `models.policy.load_policy` reads it.

    Sharded, the full weights are gathered to rank 0's CPU first; the folder is the same either
    way: a Hugging Face model that plain `transformers` loads, and the value head beside it (or the
    separate value network in `value_model/`).
    """
    from ..models.policy import VALUE_HEAD_FILE, save_head, save_policy, save_value_model

    world = trainer.world
    if not world.sharded:
        if world.is_main:
            save_policy(
                trainer.policy, tokenizer, directory, merged=merged, value_model=trainer.value_model
            )
        world.barrier()
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)  # on rank 0 only
    lm = get_model_state_dict(trainer.policy.lm, options=whole)
    value_head = trainer.policy.value_head  # None for the critic-free estimators
    head = get_model_state_dict(value_head, options=whole) if value_head is not None else None
    critic = trainer.value_model  # --value-model reward
    if critic is not None:
        critic_lm = get_model_state_dict(critic.lm, options=whole)
        critic_head = get_model_state_dict(critic.value_head, options=whole)
    if world.is_main:
        directory = Path(directory)
        trainer.policy.lm.save_pretrained(directory, state_dict=lm, safe_serialization=True)
        tokenizer.save_pretrained(directory)
        if head is not None:
            save_head(head, directory / VALUE_HEAD_FILE)
        if critic is not None:
            save_value_model(critic, directory, lm_state=critic_lm, head_state=critic_head)
    world.barrier()
