"""Process-group setup for ``torchrun`` (one process per GPU, or gloo processes on CPU)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: Global rank.
        world_size: Number of processes.
        local_rank: Rank on this node (selects the GPU).
        device: The device this process trains on.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that writes files)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group is in use."""
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise the process group from torchrun's environment, or run as one process.

    ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (set by ``torchrun``, also across nodes through
    its rendezvous) select the process; with NCCL on GPUs and gloo on CPUs. Without them, or
    with a world size of 1, no process group is created.

    Args:
        device: ``auto`` (CUDA when available), ``cuda`` or ``cpu``.

    Raises:
        ValueError: ``cuda`` requested but not available, or an unknown device name.
    """
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"unknown device {device!r}; choose auto, cuda or cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA GPU is available")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        torch_device = torch.device("cuda", torch.cuda.current_device())
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=timedelta(minutes=30),
            device_id=torch_device if use_cuda else None,
        )
    return DistInfo(rank, world_size, local_rank, torch_device)


def cleanup_distributed() -> None:
    """Destroy the process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Synchronise all ranks (no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (the tensor itself in one process)."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def max_over_ranks(values: Sequence[int], device: torch.device) -> list[int]:
    """Elementwise maximum of small integers over ranks (the values themselves in one process).

    Args:
        values: This rank's integers.
        device: Where the collective runs (the rank's GPU for NCCL, the CPU for gloo).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    flags = torch.tensor(list(values), dtype=torch.int64, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [int(v) for v in flags.tolist()]


def union_over_ranks(items: set[str]) -> set[str]:
    """Union of a set of strings over ranks (a copy of the set in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return set(items)
    gathered: list[set[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return set().union(*(part for part in gathered if part))


def ranks_agree(values: torch.Tensor) -> bool:
    """True when ``values`` is bitwise identical on every rank (always True in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    gathered = [torch.zeros_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, values.contiguous())
    return all(torch.equal(gathered[0], other) for other in gathered[1:])
