"""The processes a run is spread over, as the trainer sees them.

The trainer never asks how many processes there are to decide what to compute: each process
samples and scores its share of the global batch, the shares are gathered so that every process
holds the whole batch, and from there on every statistic (whitening, baselines, loss
normalisation, metrics) is computed on the whole batch, identically everywhere. `World` is the one
process case, where every collective is the identity; `TorchWorld` is a torch.distributed group
(gloo on the CPU, NCCL on CUDA), started by `launch.init_world` under torchrun.

How the models are spread is decided here too (`parallelize`): in one process nothing changes;
data-parallel, the trained modules are wrapped in DDP (gradients averaged); with `--shard`, the
policy, reference, reward and value models are sharded with FSDP2 (`fully_shard`), each
transformer block and then the model.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, RLHFError


class World:
    """A single process: rank 0 of 1. Collectives return their input."""

    rank: int = 0
    size: int = 1
    sharded: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This process's contiguous share of `n` rows (n must divide evenly)."""
        per = n // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over processes (a new tensor)."""
        return tensor.clone()

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise maximum over processes (a new tensor)."""
        return tensor.clone()

    def all_done(self, local_done: bool) -> bool:
        """True when every process is done (used to keep sharded forward passes in step)."""
        return local_done

    def any_process(self, flag: bool) -> bool:
        """True when `flag` is true on any process."""
        return flag

    def gathered(self, module: nn.Module) -> contextlib.AbstractContextManager:
        """A context in which `module`'s sharded parameters stay gathered between forward passes
        (for sampling); nothing to do with whole copies."""
        return contextlib.nullcontext()

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's rows (equal shapes past dim 0), concatenated in rank order."""
        return tensor

    def gather_objects(self, items: list) -> list:
        """Every process's list, concatenated in rank order."""
        return list(items)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every process (picklable)."""
        return obj

    def barrier(self) -> None:
        pass

    def main_first(self, fn: Callable[[], Any]) -> Any:
        """`fn()` on rank 0, then on the others once it has succeeded.

        For loading: rank 0 meets every bad input first (and fills caches, such as the built-in
        task's reward model, once); when it fails, the others stop with the same exit code
        without running `fn` or printing anything (`PeerFailed`).
        """
        return fn()

    def parallelize(self, trained: TrainedModules, frozen: list, shard: bool) -> nn.Module:
        """The module that runs the trained models' forward passes (here: `trained` itself)."""
        return trained


class TorchWorld(World):
    """The processes of the default torch.distributed group.

    CPU tensors travel over gloo and CUDA tensors over NCCL (`launch.init_world` starts the group
    with both where there is a GPU). `device` is where this process's models live.
    """

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(device)
        self.sharded = False
        self._gathered = False  # inside `gathered`: sampling needs no lockstep

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        self.dist.all_reduce(out, op=self.dist.ReduceOp.SUM)
        return out

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        self.dist.all_reduce(out, op=self.dist.ReduceOp.MAX)
        return out

    def all_done(self, local_done: bool) -> bool:
        # Only sharded models need the processes to run the same forward passes: with whole
        # copies (DDP), or gathered ones, a process that is done may stop, and the gather pads
        # its rows.
        if not self.sharded or self._gathered:
            return local_done
        flag = torch.tensor([0 if local_done else 1], device=self.device)
        return int(self.all_reduce_max(flag)[0]) == 0

    def any_process(self, flag: bool) -> bool:
        return int(self.all_reduce_max(torch.tensor([int(flag)], device=self.device))[0]) == 1

    @contextlib.contextmanager
    def gathered(self, module: nn.Module):
        """Under FSDP2, `module`'s blocks are all-gathered by the first forward pass and kept until
        the context ends, instead of gathered again in every forward pass: one all-gather per
        block for a whole sampled batch rather than one per block and token. The processes then
        need not stay in step while they sample."""
        from torch.distributed.fsdp import FSDPModule

        if not (self.sharded and isinstance(module, FSDPModule)):
            yield
            return
        module.set_reshard_after_forward(False, recurse=True)
        self._gathered = True
        try:
            yield
        finally:
            self._gathered = False
            module.set_reshard_after_forward(True, recurse=True)
            module.set_reshard_after_forward(False, recurse=False)  # a root's own default
            for m in module.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        sent = tensor.contiguous()
        if sent.dtype == torch.bool:  # not every backend reduces or gathers bool
            return self.gather_rows(sent.to(torch.uint8)).bool()
        parts = [torch.empty_like(sent) for _ in range(self.size)]
        self.dist.all_gather(parts, sent)
        return torch.cat(parts)

    def gather_objects(self, items: list) -> list:
        parts: list = [None] * self.size
        self.dist.all_gather_object(parts, list(items))
        return [x for part in parts for x in part]

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj if self.is_main else None]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        self.dist.barrier()

    def main_first(self, fn: Callable[[], Any]) -> Any:
        if self.is_main:
            try:
                result = fn()
            except BaseException as exc:
                user_error = isinstance(exc, RLHFError)
                self.broadcast_object(getattr(exc, "exit_code", 2 if user_error else 1))
                self.barrier()  # every process has the news: all exit together
                raise
            self.broadcast_object(0)
            return result
        code = self.broadcast_object(None)
        if code:
            self.barrier()
            raise PeerFailed(code)
        return fn()

    def parallelize(self, trained: TrainedModules, frozen: list, shard: bool) -> nn.Module:
        if shard:
            shard_models(trained, frozen, self)
            self.sharded = True
            return trained
        from torch.nn.parallel import DistributedDataParallel

        # Buffers (attention masks, rotary tables) are the same everywhere; syncing them would
        # add a collective to every forward pass, generation's included.
        options = inspect.signature(DistributedDataParallel).parameters
        no_buffer_sync = (
            {"forward_sync_buffers": False}  # torch >= 2.13
            if "forward_sync_buffers" in options
            else {"broadcast_buffers": False}
        )
        on_cuda = self.device.type == "cuda"
        return DistributedDataParallel(
            trained,
            device_ids=[self.device.index] if on_cuda else None,
            **no_buffer_sync,
            # With a separate value network the policy's own value head gets no gradient.
            find_unused_parameters=trained.value_model is not None,
        )


class PeerFailed(RLHFError):
    """Rank 0 stopped (it printed why); this process stops with the same exit code, silently."""

    def __init__(self, exit_code: int):
        super().__init__(f"rank 0 stopped with exit code {exit_code}")
        self.exit_code = exit_code


class TrainedModules(nn.Module):
    """Everything the optimizer trains: the policy with its value head, and the separate value
    network when there is one. One module, so that one DDP wrapper averages all the gradients
    and one state dict (`torch.distributed.checkpoint`) holds them."""

    def __init__(self, policy: nn.Module, value_model: nn.Module | None):
        super().__init__()
        self.policy = policy
        self.value_model = value_model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int = 0,
        prompt_length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, K, V) of the last K positions (all with 0) and values (B, T);
        `prompt_length` as `PolicyWithValueHead.forward` takes it."""
        logits, values = self.policy(
            input_ids, attention_mask, logits_to_keep=logits_to_keep, prompt_length=prompt_length
        )
        if self.value_model is not None:
            values = self.value_model(input_ids, attention_mask)  # (B, T)
        return logits, values


def sync_gradients(module: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """DDP's `no_sync()` unless `sync`: micro-batches before a minibatch's last one only
    accumulate their gradients locally; the last one's backward averages the sum once."""
    if sync or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor (`clip_grad_norm_` returns a DTensor for sharded
    parameters)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated layers of a Hugging Face model: the classes it names in `_no_split_modules`
    (what accelerate and transformers' FSDP wrapping use), else the longest `ModuleList`."""
    from ..models.forward import unwrap

    names = set()
    for module in model.modules():
        names |= set(getattr(unwrap(module), "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard_models(trained: TrainedModules, frozen: list, world: TorchWorld) -> None:
    """FSDP2 over every model, in place: each transformer block, then the model.

    The policy's LM is sharded as a model of its own, with its value head as a second one: the
    rollout calls the LM directly to sample, and FSDP2 all-gathers a module's parameters only in
    that module's own forward (a call that skipped the root's would find them still sharded).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # The policy's outputs are views (its logits are sliced to the response); nothing here
    # changes them in place, which is what this warning is about.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(world.device.type, (world.size,))
    policy = trained.policy
    roots = [policy.lm, policy.value_head, trained.value_model, *frozen]
    for root in roots:
        if root is None:
            continue
        for block in transformer_blocks(root):
            fully_shard(block, mesh=mesh)
        fully_shard(root, mesh=mesh)


def check_world(cfg, world: World) -> None:
    """Refuse, in one line, global sizes that do not split evenly over the processes."""
    if world.size == 1:
        return
    how = f"{world.size} processes (torchrun --nproc-per-node x --nnodes)"
    for name in ("batch_size", "minibatch_size"):
        value = getattr(cfg, name)
        if value % world.size:
            raise ConfigError(
                f"--{name.replace('_', '-')} {value} does not split evenly over {how}; "
                f"use a multiple of {world.size}, such as {max(world.size, value - value % world.size)}"
            )


class Discard:
    """Stands in for a metrics or samples writer on processes other than rank 0."""

    def log(self, *args, **kwargs) -> None:
        pass

    def write(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> Discard:
        return self

    def __exit__(self, *exc) -> None:
        pass
