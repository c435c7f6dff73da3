"""Data-parallel training under ``torchrun``: one process per CPU core group or GPU, same result.

``python -m training train`` runs unchanged under ``torchrun --nproc_per_node N``: torchrun sets
``WORLD_SIZE``/``RANK``/``LOCAL_RANK``, :func:`init_distributed` joins the process group (gloo on
CPU, nccl on CUDA), and every process

- builds the same model from the same seed and the same list of *global* batches
  (``--batch-size`` is the global batch), and trains on its own contiguous shard of each one;
- scales its loss by ``local rows / global rows``, so that the sum over processes of the local
  gradients is exactly the gradient of the global batch's mean loss (every loss term is a row
  mean, or a parameter penalty whose weights sum to one over the processes);
- sums gradients and the step's statistics in one ``all_reduce`` per step.

Gradients are reduced by hand after ``backward`` rather than by ``DistributedDataParallel``'s hooks:
a gated site whose gate is off on every row of a shard gets no gradient there (DDP would need
``find_unused_parameters`` and a forward through its wrapper), and one flat all-reduce of the few
trainable tensors of an adapter costs less than DDP's bucketing machinery saves.
Rank 0 alone evaluates on dev, post-processes, shows the progress bar and writes the checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a (possibly one-process) data-parallel run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that evaluates, reports and writes the checkpoint."""
        return self.rank == 0

    def shard(self, indices: Sequence[int]) -> list[int]:
        """This rank's contiguous part of a global batch (sizes differ by at most one; may be empty).

        Contiguous, not strided: batches are sorted by length, so a contiguous shard pads the least.
        """
        base, extra = divmod(len(indices), self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return list(indices[start : start + base + (1 if self.rank < extra else 0)])

    def all_reduce_sum(self, gradients: Sequence[torch.nn.Parameter], stats: Sequence[float]) -> list[float]:
        """Sum every parameter's gradient and ``stats`` over all ranks, in one collective.

        A parameter without a gradient on this rank (its site never ran here) contributes zeros and
        gets the summed gradient like the others. Returns the summed ``stats``.
        """
        if not self.enabled:
            return list(stats)
        params = list(gradients)
        device = params[0].device if params else torch.device("cpu")
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float32) for p in params]
        parts.append(torch.tensor(list(stats), dtype=torch.float32, device=device))
        flat = torch.cat(parts)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for param in params:
            count = param.numel()
            reduced = flat[offset : offset + count].view_as(param).to(param.dtype)
            if param.grad is None:
                param.grad = reduced.clone()
            else:
                param.grad.copy_(reduced)
            offset += count
        return flat[offset:].tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device: torch.device) -> tuple[DistributedContext, torch.device]:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1; returns the context and this rank's device.

    On CUDA each process takes the GPU of its ``LOCAL_RANK`` and nccl; elsewhere gloo.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext(), device
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank), device


def shutdown_distributed(context: DistributedContext) -> None:
    """Leave the process group (after the checkpoint is written, so no rank exits early)."""
    if context.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
