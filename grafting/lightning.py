"""Filter grafting in PyTorch Lightning: :class:`GraftingCallback` grafts a LightningModule with its ring
peers after every training epoch but the last, as :class:`grafting.Grafter` does in a plain loop.

    import lightning.pytorch as pl
    from grafting.lightning import GraftingCallback

    trainer = pl.Trainer(max_epochs=30, callbacks=[GraftingCallback("runs/r1", net=1, num=2)])
    trainer.fit(model, train_loader, val_loader)       # one process, or one DDP job, per network
    trainer.fit(model, train_loader, val_loader, ckpt_path="last.ckpt")   # resumes, ring and all

Lightning is an optional extra (``pip install '.[lightning]'``); this module is the only one that imports it.

When the callback acts, in Lightning's order of hooks:

- ``on_fit_start`` (after a checkpoint given to ``fit`` has restored the callback's state, before any
  training): the Grafter is made for the module, which checks the model and the rule, and opened: a
  fresh start refuses a folder another run left files in, a resumed one rejoins the ring its checkpoint
  names and first deletes its own files of the epochs it will publish again.
- ``on_train_epoch_end``, which Lightning calls after the epoch's validation: the pre-graft weights are
  published and the predecessor's grafted in, except after the last epoch (``max_epochs``). So the
  validation metrics see the pre-graft weights, as the training scripts' test does. A
  ``ModelCheckpoint`` runs after this callback in that hook (Lightning calls checkpoint callbacks
  last): a checkpoint taken when the training epoch ends (its default with one validation per epoch)
  holds the grafted weights; one taken when validation ends (``save_on_train_epoch_end=False``) holds
  the pre-graft weights and a callback state that says the epoch is not grafted yet, and Lightning runs
  this hook again for that epoch when it resumes from it.
- ``on_fit_end``: when every epoch ran, ``finish()``; an interrupted or stopped fit only closes, so that
  it can be resumed.

Under DDP every rank runs the callback; only rank 0 touches the shared folder, and the grafted weights
are broadcast to the other ranks (:class:`grafting.Grafter`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
except ImportError as err:  # the optional extra is not installed
    raise ModuleNotFoundError(
        "grafting.lightning needs PyTorch Lightning, which is not installed: pip install lightning "
        "(or, in this repository, pip install '.[lightning]')"
    ) from err

from grafting.errors import LIBRARY, UsageError
from grafting.ring.grafter import Grafter, GraftReport

__all__ = ["GraftingCallback", "LIGHTNING_WORDING"]

# A Lightning network continues from the Trainer's checkpoint, which holds the ring's identity.
LIGHTNING_WORDING = dataclasses.replace(
    LIBRARY,
    names={**LIBRARY.names, "ring": "its checkpoint"},
    resume="from its last checkpoint with trainer.fit(..., ckpt_path=...)",
    move_ring=(
        "continue ring {ring} in a root folder of its own: move its exchange files there and resume each "
        "network there from its checkpoint"
    ),
)
# The Grafter's arguments the callback fills in itself.
_OWN = ("model", "ring", "wording", "check_folder")


class GraftingCallback(pl.Callback):
    """Grafts the LightningModule with its ring peers after every training epoch but the last.

    Args:
        root: the shared folder of the ring, a new one for each run.
        net, num: this network's number (1-based) and the ring size.
        **settings: the other keyword arguments of :class:`grafting.Grafter` (``a``, ``c``, ``level``,
            ``rule``, ``criterion``, ``source``, ``invalid_threshold``, ``peer_timeout``, ``keep_all``,
            ``meta``); checked here, when the callback is made.

    Attributes:
        grafter: the :class:`grafting.Grafter` of the running fit (None before it).
        report: the last epoch's :class:`grafting.GraftReport` (None before the first graft).
    """

    def __init__(self, root: str | Path, net: int, num: int, **settings: Any) -> None:
        taken = [name for name in _OWN if name in settings]
        if taken:
            raise UsageError(f"GraftingCallback sets {', '.join(taken)} itself; leave it out")
        Grafter(root, net, num, wording=LIGHTNING_WORDING, **settings)  # checks the settings; touches nothing
        self.root, self.net, self.num, self.settings = root, net, num, settings
        self.grafter: Grafter | None = None
        self.report: GraftReport | None = None
        self._ring: str | None = None  # the ring's identity, from the Trainer's checkpoint when resuming
        self._grafted = 0  # the last epoch grafted

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse a fit whose last epoch is unknown (every network of a ring runs the same epochs)."""
        if stage == "fit" and (trainer.max_epochs is None or trainer.max_epochs < 1):
            raise UsageError(
                "GraftingCallback needs Trainer(max_epochs=N): it grafts after every epoch but the last, and "
                "every network of the ring runs the same N epochs"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Make and open the Grafter: the model and the rule are checked, the ring joined (or rejoined)."""
        resuming = self._ring is not None
        self.grafter = Grafter(
            self.root,
            self.net,
            self.num,
            model=pl_module,
            ring=self._ring,
            wording=LIGHTNING_WORDING,
            **self.settings,
        )
        self.grafter.open()
        self._ring = self.grafter.ring
        if resuming:  # an interrupted attempt's files of the epochs this fit publishes again
            self.grafter.discard_from(self._grafted + 1)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Publish this epoch's weights and graft the predecessor's, unless it is the last epoch."""
        epoch = trainer.current_epoch + 1  # the Grafter counts finished epochs from 1
        assert trainer.max_epochs is not None and self.grafter is not None
        if epoch >= trainer.max_epochs or epoch <= self._grafted:
            return  # the last epoch's weights are the result; an epoch grafted before its checkpoint
        self.report = self.grafter.step(pl_module, epoch)
        self._grafted = epoch
        rank_zero_info(f"grafting: net {self.net}: {self.report.summary()}")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Finish the ring's files when every epoch ran; otherwise keep them for a resume."""
        assert trainer.max_epochs is not None and self.grafter is not None
        if trainer.current_epoch >= trainer.max_epochs:
            self.grafter.finish()
        else:
            rank_zero_warn(
                f"grafting: net {self.net} stopped after epoch {trainer.current_epoch} of {trainer.max_epochs}; "
                f"its peers wait for its next epoch: resume it with trainer.fit(..., ckpt_path=...)"
            )
        self.grafter.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Release the network's lock; the files stay for a resume."""
        if self.grafter is not None:
            self.grafter.close()

    def state_dict(self) -> dict[str, Any]:
        """What the Trainer's checkpoint keeps: the ring's identity and the last epoch grafted."""
        return {"ring": self._ring, "grafted": self._grafted}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (Lightning calls it before ``on_fit_start`` when resuming)."""
        self._ring = state_dict.get("ring")
        self._grafted = int(state_dict.get("grafted", 0))
