"""The processes a run is spread over, as the trainer sees them.

The trainer never asks how many processes there are to decide what to compute: each process
samples and scores its share of the global batch, the shares are gathered so that every process
holds the whole batch, and from there on every statistic (whitening, baselines, loss
normalisation, metrics) is computed on the whole batch, identically everywhere. `World` is the one
process case, where every collective is the identity.
"""

from __future__ import annotations

import torch


class World:
    """A single process: rank 0 of 1. Collectives return their input."""

    rank: int = 0
    size: int = 1

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

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's rows (equal shapes past dim 0), concatenated in rank order."""
        return tensor

    def gather_objects(self, items: list) -> list:
        """Every process's list, concatenated in rank order."""
        return list(items)

    def barrier(self) -> None:
        pass
