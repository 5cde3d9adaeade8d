"""Process-group setup for ``torchrun`` (one process per GPU, or gloo processes on CPU)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
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


_TORCHRUN_HINT = (
    "start a run of several processes with torchrun, which sets RANK, WORLD_SIZE and "
    "LOCAL_RANK, or unset them to train in one process"
)


def torchrun_environment(env: Mapping[str, str]) -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's variables, checked for consistency.

    Unset, they describe one process (0, 1, 0).

    Raises:
        ValueError: A value that is not an integer, a rank outside ``[0, WORLD_SIZE)`` (such
            as ``RANK=1`` without ``WORLD_SIZE``), or a world of several processes without
            ``RANK`` or ``LOCAL_RANK``.
    """
    values: dict[str, int] = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        if name in env:
            try:
                values[name] = int(env[name])
            except ValueError:
                raise ValueError(
                    f"{name}={env[name]!r} is not an integer; {_TORCHRUN_HINT}"
                ) from None
    world_size = values.get("WORLD_SIZE", 1)
    if world_size < 1:
        raise ValueError(f"WORLD_SIZE={world_size} is not a number of processes; {_TORCHRUN_HINT}")
    if world_size > 1:
        missing = [name for name in ("RANK", "LOCAL_RANK") if name not in values]
        if missing:
            raise ValueError(
                f"WORLD_SIZE={world_size} but {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not set; {_TORCHRUN_HINT}"
            )
    world = f"WORLD_SIZE={world_size}" if "WORLD_SIZE" in values else "WORLD_SIZE unset (1)"
    rank, local_rank = values.get("RANK", 0), values.get("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is not in [0, {world_size}) ({world}); {_TORCHRUN_HINT}")
    local_size = values.get("LOCAL_WORLD_SIZE", world_size)
    if not 0 <= local_rank < min(local_size, world_size):
        raise ValueError(
            f"LOCAL_RANK={local_rank} is not in [0, {min(local_size, world_size)}) ({world}"
            f"{f', LOCAL_WORLD_SIZE={local_size}' if 'LOCAL_WORLD_SIZE' in values else ''}); "
            f"{_TORCHRUN_HINT}"
        )
    return rank, world_size, local_rank


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise the process group from torchrun's environment, or run as one process.

    ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (set by ``torchrun``, also across nodes through
    its rendezvous) select the process; with NCCL on GPUs and gloo on CPUs. Without them, or
    with a world size of 1, no process group is created.

    Args:
        device: ``auto`` (CUDA when available), ``cuda`` or ``cpu``.

    Raises:
        ValueError: ``cuda`` requested but not available, an unknown device name, or
            torchrun's variables that do not fit together (see :func:`torchrun_environment`).
    """
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"unknown device {device!r}; choose auto, cuda or cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA GPU is available")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    rank, world_size, local_rank = torchrun_environment(os.environ)
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
