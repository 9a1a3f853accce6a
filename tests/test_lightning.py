"""grafting.lightning: Lightning Trainers graft exactly as the plain Grafter does, resume with
the Trainer's checkpoint, and under DDP exchange on rank 0 alone while every rank gets the grafted
weights. The networks' data, model and Trainer are tests/lightning_net.py's."""

from __future__ import annotations

import importlib
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import REPO, finish, start_process
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_net import EPOCHS, Tiny, batches, trainer
from torch import nn

from grafting import Grafter
from grafting.errors import GraftingError, UsageError
from grafting.lightning import GraftingCallback

SCRIPT = REPO / "tests" / "lightning_net.py"

# Lightning's own notices, not this project's: the local Slurm of the cluster tests puts `srun` on PATH, and
# Lightning's pytree helper uses a torch class torch has deprecated. Filtered here, they are not sent to
# pytest-xdist's controller either, which would import Lightning (and torch) to read them back.
pytestmark = [
    pytest.mark.filterwarnings("ignore:The `srun` command is available on your system but is not used"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The processes run with one thread; so does the reference here (same arithmetic, bit for bit)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def plain_ring(root: Path) -> list[dict[str, torch.Tensor]]:
    """Both networks trained in an ordinary loop with the plain Grafter, on the same seeds and batches."""
    models = [Tiny(1), Tiny(2)]
    optimizers = [model.configure_optimizers() for model in models]
    with Grafter(root, 1, 2) as one, Grafter(root, 2, 2) as two:
        for epoch in range(1, EPOCHS + 1):
            for net, (model, optimizer) in enumerate(zip(models, optimizers), start=1):
                model.train()
                for index, batch in enumerate(batches(net)):
                    optimizer.zero_grad()
                    model.training_step(batch, index).backward()
                    optimizer.step()
            if epoch < EPOCHS:
                for grafter, model in ((one, models[0]), (two, models[1])):
                    grafter.publish(model, epoch)
                for grafter, model in ((one, models[0]), (two, models[1])):
                    grafter.graft(model, epoch)
        one.finish()
        two.finish()
    return [model.state_dict() for model in models]


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.e2e
@pytest.mark.slow
def test_two_lightning_trainers_graft_exactly_as_the_plain_grafter(tmp_path: Path) -> None:
    ring = tmp_path / "ring"
    procs = [
        start_process(
            [sys.executable, str(SCRIPT), str(ring), str(net), "2", str(tmp_path / f"net{net}"), "1"],
            tmp_path,
            f"net{net}",
            merge_output=True,
        )
        for net in (1, 2)
    ]
    for proc, code in zip(procs, finish(procs)):
        assert code == 0, proc.report()
        grafted = re.findall(r"grafting: net \d: epoch (\d): grafted network \d", proc.log)
        assert grafted == ["1", "2"], proc.log  # after every epoch but the last
    assert sorted(p.name for p in ring.iterdir()) == ["ring.json"], "a finished ring leaves nothing to graft"
    expected = plain_ring(tmp_path / "plain")
    for net in (1, 2):
        got = torch.load(tmp_path / f"net{net}.rank0.pt", weights_only=True)
        assert equal(got, expected[net - 1]), f"network {net}'s weights differ from the plain Grafter's"


@pytest.mark.e2e
@pytest.mark.slow
def test_a_ddp_network_exchanges_on_rank_0_and_every_rank_gets_the_grafted_weights(tmp_path: Path) -> None:
    """Network 1 is a Trainer on two gloo ranks; network 2, the plain Grafter here, notes who holds network
    1's lock while it grafts."""
    ring = tmp_path / "ring"
    proc = start_process(
        [sys.executable, str(SCRIPT), str(ring), "1", "2", str(tmp_path / "net1"), "2"],
        tmp_path,
        "net1",
        merge_output=True,
    )
    owners: list[str] = []
    failures: list[BaseException] = []

    def network_2() -> None:
        model = Tiny(2)
        try:
            with Grafter(ring, 2, 2, peer_timeout=240) as grafter:
                # Network 1 holds its lock from before its first file until after it has read this network's
                # last one: it is there after grafting epoch 1, and before this network publishes the next.
                for epoch in range(1, EPOCHS):
                    if epoch > 1:
                        owners.append((ring / "net1.lock").read_text().split()[0])
                    grafter.step(model, epoch)
                    if epoch == 1:
                        owners.append((ring / "net1.lock").read_text().split()[0])
                grafter.finish()
        except BaseException as err:  # noqa: BLE001 - reported by the test
            failures.append(err)

    peer = threading.Thread(target=network_2)
    peer.start()
    (code,) = finish([proc])
    peer.join(timeout=300)
    assert code == 0 and not failures, f"{failures}\n{proc.report()}"
    pids = dict(re.findall(r"rank (\d) pid (\d+)", proc.log))
    assert sorted(pids) == ["0", "1"], proc.log
    assert owners == [pids["0"]] * (EPOCHS - 1), "only rank 0 holds the network's place in the folder"
    ranks = [torch.load(tmp_path / f"net1.rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    # DDP keeps ranks equal by averaging gradients, never weights: a rank without the grafted ones would differ.
    assert equal(ranks[0], ranks[1])
    assert sorted(p.name for p in ring.iterdir()) == ["ring.json"]


class Interrupted(Exception):
    """Stands for a crash or a preemption."""


class StopAt(pl.Callback):
    """Raises at the start of epoch ``epoch`` (1-based)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 == self.epoch:
            raise Interrupted(f"stopped before epoch {self.epoch}")


def untrained_peer(root: Path) -> tuple[threading.Thread, nn.Module]:
    """Network 2 of the ring in a thread: it grafts every epoch but the last and trains nothing, so its
    weights depend on network 1's alone."""
    model = Tiny(2)

    def run() -> None:
        with Grafter(root, 2, 2, peer_timeout=120) as grafter:
            for epoch in range(1, EPOCHS):
                grafter.step(model, epoch)
            grafter.finish()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, model


@pytest.mark.parametrize("when", ["train epoch end", "validation end"])
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")  # the resume writes on in it
def test_a_fit_resumed_from_the_trainers_checkpoint_ends_as_an_uninterrupted_one(tmp_path: Path, when: str) -> None:
    """ModelCheckpoint saves after this callback's graft at the end of the training epoch (its default with
    one validation per epoch), or when validation ends, before the graft: resumed from such a checkpoint,
    the callback rejoins its ring and grafts that epoch then."""

    def saving(folder: Path) -> ModelCheckpoint:
        return ModelCheckpoint(dirpath=folder, save_last=True, save_on_train_epoch_end=when == "train epoch end")

    whole = tmp_path / "whole"
    peer, _ = untrained_peer(whole)
    uninterrupted = Tiny(1)
    trainer([GraftingCallback(whole, 1, 2, peer_timeout=120)]).fit(uninterrupted, batches(1), batches(1))
    peer.join(timeout=120)

    parts = tmp_path / "parts"
    peer, _ = untrained_peer(parts)
    first = GraftingCallback(parts, 1, 2, peer_timeout=120)
    checkpoints = tmp_path / "ckpt"
    with pytest.raises(Interrupted):
        trainer([first, StopAt(EPOCHS), saving(checkpoints)]).fit(Tiny(1), batches(1), batches(1))
    # Started afresh in that folder, it refuses, and says how to go on.
    with pytest.raises(GraftingError) as caught:
        trainer([GraftingCallback(parts, 1, 2)]).fit(Tiny(1), batches(1), batches(1))
    assert str(caught.value).endswith(
        "restart this network from its last checkpoint with trainer.fit(..., ckpt_path=...)"
    ), caught.value
    resumed = GraftingCallback(parts, 1, 2, peer_timeout=120)
    model = Tiny(1)
    trainer([resumed, saving(checkpoints)]).fit(model, batches(1), batches(1), ckpt_path=checkpoints / "last.ckpt")
    peer.join(timeout=120)
    assert resumed.grafter is not None and first.grafter is not None
    assert resumed.grafter.ring == first.grafter.ring
    if when == "validation end":  # the checkpoint's epoch is grafted when the fit resumes
        assert resumed.report is not None and resumed.report.epoch == EPOCHS - 1
    else:
        assert resumed.report is None, "nothing was left to graft"
    assert equal(model.state_dict(), uninterrupted.state_dict())
    assert sorted(p.name for p in parts.iterdir()) == ["ring.json"]


def test_the_callback_refuses_what_cannot_work_before_any_training(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"a must lie in \[0, 1\]"):
        GraftingCallback(tmp_path, 1, 2, a=2)
    with pytest.raises(UsageError, match="GraftingCallback sets ring itself"):
        GraftingCallback(tmp_path, 1, 2, ring="0123456789ab")
    with pytest.raises(UsageError, match=r"needs Trainer\(max_epochs=N\)"):
        trainer([GraftingCallback(tmp_path, 1, 2)], max_epochs=-1).fit(Tiny(1), batches(1), batches(1))
    # A rule that cannot group the module fails when the fit starts, before its first batch.
    with pytest.raises(UsageError, match="the name rule needs .* use rule='module'"):
        trainer([GraftingCallback(tmp_path, 1, 2, rule="name"), StopAt(1)]).fit(Unnamed(), batches(1), batches(1))


class Unnamed(Tiny):
    """Tiny with its conv under a name without 'conv', registered last: the first key is 'bn.weight'."""

    def __init__(self) -> None:
        super().__init__(1)
        self.first = nn.Conv2d(3, 4, 3)
        del self.conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.first(x)).relu().mean((2, 3)))


def test_without_lightning_the_callback_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "grafting.lightning")
    with pytest.raises(ModuleNotFoundError, match=r"needs PyTorch Lightning.*pip install lightning.*'\.\[lightning\]'"):
        importlib.import_module("grafting.lightning")
