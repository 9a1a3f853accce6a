"""Learning-rate recipes of docs/METHOD.md §6: the dlr factor, step and per-iteration cosine schedules,
and the optimizer of a run.

Both schedules are stepped once per batch (a LambdaLR over the iteration count), so a resumed run
restores one counter and the step schedule equals the original's per-epoch StepLR (CIFAR) or per-epoch
``lr0 * 0.1 ** (epoch // 30)`` (ImageNet).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from grafting.train.config import RunConfig

__all__ = ["dlr_factor", "make_scheduler", "make_optimizer"]


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


def make_optimizer(
    model: nn.Module, config: RunConfig, iters_per_epoch: int
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """The run's SGD (momentum, weight decay, the initial lr of network ``config.i``: dlr when
    ``config.difflr``) and its per-iteration schedule (cosine when ``config.cos``, else x0.1 every
    ``config.step_epochs`` epochs), as both training scripts use them."""
    lr = config.lr * (dlr_factor(config.i, config.num) if config.difflr else 1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    scheduler = make_scheduler(
        optimizer,
        cosine=config.cos,
        epochs=config.epochs,
        iters_per_epoch=iters_per_epoch,
        step_epochs=config.step_epochs,
    )
    return optimizer, scheduler
