"""Several processes (torchrun, DistributedDataParallel) training ONE network: where this process
sits, its device, handing rank 0's objects to the other ranks, and BatchNorm statistics over the
network's whole batch (SyncBatchNorm). Rank 0 alone talks to the shared folder; everything the others
need comes from it through these broadcasts."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
from torch import nn

from grafting.errors import UsageError

__all__ = ["Processes", "per_process", "is_distributed", "broadcast_from_main", "check_sync_bn", "sync_batchnorm"]

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether a torch.distributed process group is running."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _cpu_copy(obj: Any) -> Any:
    """``obj`` with every tensor inside (dicts, lists, tuples) moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {key: _cpu_copy(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(value) for value in obj)
    return obj


def broadcast_from_main(obj: T) -> T:
    """Rank 0's ``obj`` on every rank of the torch.distributed group; ``obj`` itself when not distributed.

    Every rank must call it. Tensors travel as CPU tensors, so no rank unpickles one onto a GPU
    that belongs to another rank; ``load_state_dict`` moves them where they belong.
    """
    if not is_distributed():
        return obj
    box = [_cpu_copy(obj) if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return cast(T, box[0])


@dataclass(frozen=True)
class Processes:
    """Where this process sits in a torchrun launch: world_size 1 when started directly."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        """Whether torchrun started several processes for this network."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, writes files and does the exchange."""
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> Processes:
        """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE."""
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
        )


def per_process(total: int, procs: Processes, flag: str) -> int:
    """``total`` (a network's batch size) split evenly over the processes of a torchrun."""
    if total % procs.world_size:
        raise UsageError(
            f"{flag} {total} is the network's total; it must be divisible by the "
            f"{procs.world_size} processes of this torchrun"
        )
    return total // procs.world_size


def check_sync_bn(enabled: bool, procs: Processes, device: torch.device) -> None:
    """Raise :class:`UsageError` when ``--sync-bn`` cannot work: several processes on the CPU (PyTorch's
    SyncBatchNorm synchronises GPU tensors only)."""
    if enabled and procs.distributed and device.type != "cuda":
        raise UsageError(
            f"--sync-bn needs GPUs: SyncBatchNorm does not run on {device.type} processes; leave --sync-bn "
            f"out, or train this network in one process (without torchrun) for BatchNorm over its whole batch"
        )


def sync_batchnorm(model: nn.Module, procs: Processes, device: torch.device, enabled: bool) -> nn.Module:
    """``model`` with every BatchNorm a SyncBatchNorm when ``enabled`` and several processes train it, so
    that each computes its batch statistics (and running statistics) over the network's whole batch, as
    one process holding the whole batch would; else ``model`` unchanged. The state_dict keeps its keys
    and values. Call it before wrapping the model in DistributedDataParallel."""
    check_sync_bn(enabled, procs, device)
    if not (enabled and procs.distributed):
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
