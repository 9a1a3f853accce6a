"""Learning-rate recipes of docs/METHOD.md §6: the dlr factor, step and per-iteration cosine schedules.

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
    total_iters, iters_per_epoch = max(1, epochs * iters_per_epoch), max(1, iters_per_epoch)

    # Plain closures, not callable objects: LambdaLR saves and restores the attributes of callable
    # objects, which would pin a resumed run to the old --epochs; closures follow the current flags.
    def cosine_factor(it: int) -> float:
        return (1 + math.cos(math.pi * min(it, total_iters) / total_iters)) / 2

    def step_factor(it: int) -> float:
        return gamma ** ((it // iters_per_epoch) // step_epochs)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_factor if cosine else step_factor)
