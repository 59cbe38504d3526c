"""Joining the process group when `rlhf` runs under torchrun.

    torchrun --nproc-per-node 2 -m rlhf ppo ...                       # one machine
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 --rdzv-id RUN -m rlhf ppo ...       # on each machine

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address in each process's
environment; `init_world` reads them and starts the default group: gloo on the CPU, and on CUDA
NCCL for GPU tensors (with gloo beside it for CPU tensors), each process on GPU LOCAL_RANK.
Without them it returns the one-process `World`.
"""

from __future__ import annotations

import atexit
import os

import torch

from ..errors import ConfigError
from .distributed import TorchWorld, World

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched() -> bool:
    """Whether torchrun (or a launcher that sets the same variables) started this process."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def require_one_process(command: str) -> None:
    """Refuse to run `rlhf COMMAND` as several processes: only `rlhf ppo` is distributed."""
    if launched() and int(os.environ["WORLD_SIZE"]) > 1:
        raise ConfigError(
            f"`rlhf {command}` runs in one process; start it without torchrun "
            "(of the commands, only `rlhf ppo` runs on several processes)"
        )


def init_world(device: str = "auto") -> World:
    """The processes this run is spread over; starts the default group under torchrun.

    `device` is the run's --device (auto, cpu or cuda): on CUDA each process takes the GPU its
    LOCAL_RANK names. A group started elsewhere (by the caller) is used as it is.
    """
    import torch.distributed as dist

    from ..models.loading import pick_device

    if dist.is_available() and dist.is_initialized():
        return TorchWorld(_local_device(pick_device(device)))
    if not launched():
        return World()
    chosen = _local_device(pick_device(device))
    if chosen.type == "cuda":
        if chosen.index >= torch.cuda.device_count():
            raise ConfigError(
                f"torchrun started process {chosen.index} of this machine, which has "
                f"{torch.cuda.device_count()} GPU(s): start at most one process per GPU "
                "(--nproc-per-node), or run on the CPU with --device cpu"
            )
        torch.cuda.set_device(chosen)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, **_fresh_store())
    atexit.register(_leave)
    return TorchWorld(chosen)


def _fresh_store() -> dict:
    """The store to meet in, apart from what an earlier attempt left there (torchrun restarts).

    torchrun (torch >= 2.5) keeps one TCPStore across `--max-restarts` attempts, so the new
    processes can read the addresses the failed ones published and connect to dead ports
    (pytorch/pytorch#135712). With one agent, TORCHELASTIC_RESTART_COUNT numbers the attempts
    alike in every process, and each attempt gets keys of its own. Several agents count their
    restarts apart: there, run torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 instead.
    """
    import torch.distributed as dist

    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if not shared or os.environ.get("GROUP_WORLD_SIZE", "1") != "1":
        return {}
    store, rank, size = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {
        "store": dist.PrefixStore(f"rlhf/attempt-{attempt}", store),
        "rank": rank,
        "world_size": size,
    }


def _local_device(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
