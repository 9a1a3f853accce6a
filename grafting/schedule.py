"""Learning-rate recipes of METHOD.md §6: the dlr factor, step and per-iteration cosine schedules.

Both schedules are stepped once per batch (a LambdaLR over the iteration count), so a resumed run
restores one counter and the step schedule equals the original's per-epoch StepLR.
"""
from __future__ import annotations

import math

import torch

__all__ = ["dlr_factor", "make_scheduler"]


def dlr_factor(net: int, num: int) -> float:
    """Initial-lr multiplier of network ``net`` of ``num`` under "dlr": ``(1 + cos(pi (num - net) / num)) / 2``.

    The last network keeps the full lr; the others start lower, so the networks differ.
    """
    return (1 + math.cos(math.pi * (num - net) / num)) / 2


class _Cosine:
    """lr factor ``(1 + cos(pi t / T)) / 2`` at iteration t of T."""

    def __init__(self, total_iters: int) -> None:
        self.total_iters = max(1, total_iters)

    def __call__(self, it: int) -> float:
        return (1 + math.cos(math.pi * min(it, self.total_iters) / self.total_iters)) / 2


class _Step:
    """lr factor ``gamma ** (epoch // step_epochs)``, with the epoch derived from the iteration."""

    def __init__(self, iters_per_epoch: int, step_epochs: int, gamma: float) -> None:
        self.iters_per_epoch, self.step_epochs, self.gamma = max(1, iters_per_epoch), step_epochs, gamma

    def __call__(self, it: int) -> float:
        return self.gamma ** ((it // self.iters_per_epoch) // self.step_epochs)


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    cosine: bool,
    epochs: int,
    iters_per_epoch: int,
    step_epochs: int,
    gamma: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration scheduler: cosine over all ``epochs * iters_per_epoch`` iterations, or
    x``gamma`` every ``step_epochs`` epochs (60 on CIFAR, 30 on ImageNet). Call ``.step()`` after every batch."""
    fn = _Cosine(epochs * iters_per_epoch) if cosine else _Step(iters_per_epoch, step_epochs, gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
