"""Process set-up shared by the training scripts: device, CPU threads, seeds."""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

from grafting.distributed import Processes
from grafting.errors import UsageError

__all__ = ["choose_device", "choose_process_device", "configure_threads", "seed_everything", "available_cores"]

log = logging.getLogger(__name__)


def available_cores() -> int:
    """CPU cores this process may use (affinity-aware, so containers and taskset are respected)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def choose_device(requested: str | None) -> torch.device:
    """``requested`` as a torch.device; None picks CUDA when present, else the CPU with a warning."""
    if requested is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        log.warning("no CUDA device found: training on the CPU (slow); pass --device cpu to silence this")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device '{requested}' is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {requested}: Apple's MPS is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {requested}: this project trains on cpu, cuda or cuda:N only")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise UsageError(
                f"--device {requested}: CUDA is not available on this machine (torch {torch.__version__}, {build}; "
                f"no GPU visible, or a driver too old: check nvidia-smi); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def choose_process_device(requested: str | None, procs: Processes) -> torch.device:
    """The device of this process: ``requested`` (--device, or cuda:N from --gpu N), or under torchrun
    cuda:LOCAL_RANK (the CPU with --device cpu)."""
    if not procs.distributed:
        return choose_device(requested)
    if requested and requested.startswith("cuda") and not torch.cuda.is_available():
        choose_device(requested)  # raises: an explicit cuda request never trains on the CPU
    device = choose_device(requested if requested == "cpu" else None)
    if device.type != "cuda":
        return device
    if requested not in (None, "cuda"):
        log.warning(
            f"--gpu/--device {requested} ignored under torchrun: rank {procs.rank} uses cuda:{procs.local_rank}"
        )
    if procs.local_rank >= torch.cuda.device_count():
        raise UsageError(
            f"torchrun started {procs.world_size} processes but only {torch.cuda.device_count()} "
            f"GPU(s) are visible; lower --nproc_per_node"
        )
    torch.cuda.set_device(procs.local_rank)
    return torch.device("cuda", procs.local_rank)


def configure_threads(threads: int | None, num_processes: int, device: torch.device) -> int:
    """Set torch's intra-op threads (and, on the CPU, flush denormals to zero) and return the threads.

    Several networks often share one machine; on the CPU each gets an equal share of the cores
    (``cores // num_processes``) unless ``threads`` says otherwise, so N processes never fight
    over more threads than there are cores. On CUDA one or two threads feed the GPU. ``threads`` beyond
    the cores is capped at the cores, with a warning.
    """
    cores = available_cores()
    if threads is None:
        share = max(1, cores // max(1, num_processes))
        threads = share if device.type == "cpu" else min(share, 2)
    elif threads > cores:
        # More threads than cores only slow the arithmetic down, and thousands make OpenMP hang or crash.
        log.warning(f"--threads {threads} is more than the {cores} cores this process may use; using {cores}")
        threads = cores
    torch.set_num_threads(threads)
    if device.type == "cpu":
        # Denormal floats (below 1.2e-38) appear as training goes on and make x86 arithmetic many
        # times slower: measured 318 -> 381 img/s in epoch 2 of ResNet-32 on 2 cores. Treating them
        # as zero changes nothing visible (the same losses to 4 decimals); GPUs flush them anyway.
        torch.set_flush_denormal(True)
    return threads


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
