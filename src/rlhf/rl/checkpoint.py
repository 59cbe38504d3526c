"""PPO checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a folder `checkpoints/step-NNNNNN/` (N = completed steps) holding the policy and
value weights (safetensors), `state.pt` (optimizer, scheduler, KL controller, random generator
states, prompt-stream position, the metrics logged so far), loaded back with
`torch.load(weights_only=True)`, and `config.json`, the options of the run that wrote it
(`check_resume_options` refuses a resume whose options would change the algorithm). It is written
to a temporary folder, flushed to disk and renamed into place, so a crash mid-write leaves the
previous one intact; the next save removes the half-written folder. With --shard the weights and
the optimizer are in `sharded/` instead (torch.distributed.checkpoint, a file per process,
loadable at any world size).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ConfigError, InputError
from ..tracking import option_changes
from .sharded_state import is_sharded, load_sharded, save_sharded

STEP_DIR = re.compile(r"^step-(\d{6,})$")
CONFIG_FILE = "config.json"
# Options that may differ on --resume: where things go, how often they are written, what is
# logged, and where it runs. Every other option changes the algorithm (or is restored from the
# checkpoint and would be silently ignored, as --lr and --seed are). --steps is allowed to grow
# unless the learning rate decays linearly over it.
RESUMABLE = frozenset({
    "out", "resume", "steps", "sample_every", "gold", "device", "cache_dir", "trust_remote_code",
    "save_every", "keep_checkpoints", "auto_resume", "gather_for_sampling",
    # Where the reward server is and how patiently to ask it: a run stopped by a server that
    # went away may resume against one restarted elsewhere. Its weight is part of the run.
    "reward_url", "reward_timeout", "reward_retries", "reward_batch_size",
    "report_to", "run_name",
})  # fmt: skip


def checkpoint_dirs(out: str | Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := STEP_DIR.match(p.name)) and (p / "state.pt").is_file()
    ]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | Path) -> int:
    """Completed steps of the checkpoint folder `step-NNNNNN`."""
    return int(STEP_DIR.match(Path(path).name).group(1))


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters the optimizer updates, by name: all of them, or a LoRA policy's adapters and
    value head (the frozen base is the model folder the run started from)."""
    return {
        name: p.detach().contiguous() for name, p in module.named_parameters() if p.requires_grad
    }


def load_trainable(module: nn.Module, path: Path) -> None:
    """Load what `trainable_state` saved; every trainable parameter must be in the file."""
    tensors = load_file(str(path))
    missing = set(trainable_state(module)) - set(tensors)
    unexpected = module.load_state_dict(tensors, strict=False).unexpected_keys
    if missing or unexpected:
        raise ValueError(f"missing {sorted(missing)[:1]}, unexpected {unexpected[:1]}")


def save_checkpoint(out: str | Path, step: int, trainer, extra: dict, keep: int = 2) -> Path:
    """Write the trainer's full state after `step` completed steps; keep the newest `keep`.

    In a distributed run every process calls it: rank 0 writes the replicated state; with --shard
    every process also writes its shards of the weights and optimizer (`sharded_state`).
    """
    world = trainer.world
    root = Path(out) / "checkpoints"
    target = root / f"step-{step:06d}"
    staging = None
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        staging = tempfile.mkdtemp(prefix=".tmp-", dir=root)
    staging = Path(world.broadcast_object(staging))
    sharded = trainer.config.shard
    try:
        if sharded:
            save_sharded(trainer, staging)
        if world.is_main:
            _write_replicated(trainer, staging, step, extra, sharded)
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
            _fsync_dir(root)
    except BaseException:
        if world.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    world.barrier()
    if world.is_main:
        for old in checkpoint_dirs(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _write_replicated(trainer, staging: Path, step: int, extra: dict, sharded: bool) -> None:
    if not sharded:
        save_file(trainable_state(trainer.policy), str(staging / "policy.safetensors"))
        if trainer.value_model is not None:
            save_file(
                trainable_state(trainer.value_model), str(staging / "value_model.safetensors")
            )
    state = {
        "step": step,
        # Sharded runs keep the optimizer's state with the weights' shards.
        **({} if sharded else {"optimizer": trainer.optimizer.state_dict()}),
        "scheduler": trainer.scheduler.state_dict(),
        "kl_ctl": trainer.kl_ctl.state_dict(),
        "generator": trainer.generator.get_state(),
        "cpu_generator": trainer.cpu_generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "trainer_step": trainer.step_count,
        **extra,
    }
    torch.save(state, staging / "state.pt")
    if dataclasses.is_dataclass(trainer.config):
        (staging / CONFIG_FILE).write_text(
            json.dumps(dataclasses.asdict(trainer.config), indent=2) + "\n", encoding="utf-8"
        )
    for f in staging.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, trainer) -> dict:
    """Restore the trainer from a checkpoint folder; returns the saved state (with `extra`)."""
    path = Path(path)
    try:
        state = torch.load(path / "state.pt", weights_only=True)
    except Exception as exc:  # a damaged file: say which, not a pickle traceback
        raise InputError(
            f"{path / 'state.pt'}: cannot read checkpoint ({type(exc).__name__})"
        ) from None
    if trainer.config.shard and not is_sharded(path):
        raise InputError(f"{path}: written by a run without --shard; resume without --shard")
    try:
        if is_sharded(path):  # at any world size, with or without --shard
            load_sharded(trainer, path)
        else:
            load_trainable(trainer.policy, path / "policy.safetensors")
            if trainer.value_model is not None:
                load_trainable(trainer.value_model, path / "value_model.safetensors")
    except Exception:  # another architecture or size: the state dict does not fit
        raise InputError(
            f"{path}: its weights do not fit this model; resume with the --model (and "
            "--value-model) of the run that wrote it"
        ) from None
    try:
        if "optimizer" in state:  # else it came with the shards
            trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.kl_ctl.load_state_dict(state["kl_ctl"])
        trainer.generator.set_state(state["generator"])
        trainer.cpu_generator.set_state(state["cpu_generator"])
        torch.set_rng_state(state["torch_rng"])
        trainer.step_count = state["trainer_step"]
    except Exception as exc:  # options that change the optimizer or the KL controller
        raise InputError(
            f"{path}: its training state does not fit this run ({type(exc).__name__}); "
            "resume with the options of the run that wrote it"
        ) from None
    return state


def option_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "unset" if value is None else str(value)


def check_resume_options(path: str | Path, cfg) -> None:
    """Refuse, in one line, to resume the checkpoint at `path` with options that change the run.

    The options come from the checkpoint's config.json, or from the run's own config.json beside
    `checkpoints/` for checkpoints written before they had one; with neither, nothing is checked.
    """
    path = Path(path)
    source = path / CONFIG_FILE
    if not source.is_file():
        source = path.parent.parent / CONFIG_FILE
    if not source.is_file():
        return
    try:
        saved = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{source}: cannot read ({type(exc).__name__})") from None
    differ = []
    for name, old, now in option_changes(saved, cfg):
        change = f"{option_flag(name)} {_shown(old)} -> {_shown(now)}"
        if name == "steps" and saved.get("lr_schedule") == "linear":
            differ.append(f"{change} (--lr-schedule linear fixed the decay to zero at {old} steps)")
        elif name not in RESUMABLE:
            differ.append(change)
    if differ:
        raise ConfigError(
            f"--resume: options differ from the run that wrote {path}: {', '.join(differ)}; "
            "resume with that run's values, or start a new run in another --out"
        )
