"""A tiny LightningModule, its data and its Trainer, shared by tests/test_lightning.py and its processes.

Run as a script, it trains network NET of a ring of NUM with GraftingCallback on DEVICES CPU processes
(DDP over gloo when more than one) and saves each rank's final weights to OUT.rank<r>.pt:

    python tests/lightning_net.py ROOT NET NUM OUT DEVICES
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

EPOCHS = 3


class Tiny(pl.LightningModule):
    """A conv, its BatchNorm and a classifier: every kind of entry grafting blends."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).relu().mean((2, 3)))

    def training_step(self, batch: Any, index: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, index: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def batches(net: int) -> DataLoader:
    """Network ``net``'s data, the same in every process, in a fixed order."""
    generator = torch.Generator().manual_seed(100 + net)
    x, y = torch.randn(16, 3, 8, 8, generator=generator), torch.randint(0, 2, (16,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def trainer(callbacks: list[pl.Callback], devices: int = 1, **options: Any) -> pl.Trainer:
    """A quiet CPU Trainer of ``EPOCHS`` epochs; it saves checkpoints only with a ModelCheckpoint in ``callbacks``
    (which names its folder)."""
    options.setdefault("enable_checkpointing", any(isinstance(c, ModelCheckpoint) for c in callbacks))
    options.setdefault("max_epochs", EPOCHS)
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **options,
    )


if __name__ == "__main__":
    from grafting.lightning import GraftingCallback

    root, net, num, out, devices = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    torch.set_num_threads(1)
    model = Tiny(net)
    fit = trainer([GraftingCallback(root, net=net, num=num)], devices=devices)
    fit.fit(model, batches(net), batches(net))
    torch.save(model.state_dict(), f"{out}.rank{fit.global_rank}.pt")
    print(f"rank {fit.global_rank} pid {os.getpid()}", flush=True)
