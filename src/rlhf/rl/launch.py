"""Joining the process group when `rlhf` runs under torchrun.

    torchrun --nproc-per-node 2 -m rlhf ppo ...                       # one machine
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 --rdzv-id RUN -m rlhf ppo ...       # on each machine

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address in each process's
environment; `init_world` reads them and starts the default group: gloo on the CPU, and on CUDA
NCCL for GPU tensors (with gloo beside it for CPU tensors), each process on GPU LOCAL_RANK.
Without them it returns the one-process `World`.

A worker leaves with `exit_worker` (the CLI calls it once the command is done): files flushed,
the other processes met once more when they all end the run at the same point, then `os._exit`.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys

import torch

from ..errors import ConfigError
from .distributed import TorchWorld, World

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")

# `init_world` started this process's group; every process of it ends the run at the same point
# (`leave_together`). Module state: there is one default group per process.
_joined = {"group": False, "together": False}


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
    _joined.update(group=True, together=False)
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


def started_group() -> bool:
    """Whether `init_world` started this process's group (a torchrun worker of `rlhf ppo`)."""
    return _joined["group"]


def leave_together() -> None:
    """Say that every process of the group is ending the run here, with nothing left to send:
    it finished (after its last barrier), or all agreed to stop, or all were told that rank 0
    failed. `exit_worker` then meets the others before leaving, so that rank 0's last line is
    out before torchrun sees a process end (it stops the rest when one fails)."""
    _joined["together"] = True


def exit_worker(code: int) -> None:
    """End this torchrun worker with exit code `code`, now that its command has returned.

    Returns without doing anything in a process whose group `init_world` did not start (one
    process, library use, tests). Otherwise: flushes stdout, stderr and the logs, meets the
    other processes when they all end the run together (`leave_together`), and leaves with
    `os._exit`. Not by returning: in torch 2.13 `destroy_process_group` does not stop gloo's
    threads once DDP or FSDP2 was built on the group, and those threads then race the
    interpreter's shutdown while the peer closes its sockets ("terminate called without an
    active exception", 3 of 92 two-process --shard runs; see benchmarks/stability_loop.py).
    Every file the run wrote was closed before its command returned; `os._exit` skips only the
    interpreter's teardown (and `_leave`, whose work ends with the process).
    """
    if not started_group():
        return
    import torch.distributed as dist

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # None, or closed already
            pass
    if sys.stdout is not sys.__stdout__:  # ranks 1..N print to os.devnull (`cli.main`)
        sys.stdout.close()
    if _joined["together"] and dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # a process is gone: torchrun is ending the group anyway
            pass
    os._exit(code)


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
