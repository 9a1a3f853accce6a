"""Reliability of the ring in one process: the ring's identity, the waiting a network reports,
what a peer file must be, the exchange-file protocol (restart, skip, clean-up at the end), resuming
from the newest usable checkpoint, strict config.json, the lock under fork, and bad values.

Unit tests: no training script is started here (tests/test_faults.py does that), except by the tests
marked ``e2e``, which start small Python processes of their own.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    OWN_LOOP_EXAMPLE,
    child_env,
    finish,
    one_line,
    popen_forked,
    same_weights,
    set_cifar_label,
    start_process,
    virtual_clock,
    wait_until,
)
from torch import nn

from grafting import Grafter
from grafting.archs import cifar_models
from grafting.checkpoint import MAGNITUDE_RATIO, capture_rng_state, load_file, restore_rng_state
from grafting.data.cifar import load_cifar
from grafting.data.fake import write_fake_cifar
from grafting.errors import (
    CheckpointError,
    DatasetNotFoundError,
    GraftingError,
    LockError,
    PeerMismatchError,
    PeerTimeoutError,
    UsageError,
)
from grafting.ring import exchange_file
from grafting.ring.exchange import Exchange
from grafting.ring.exchange_file import read as read_exchange_file
from grafting.ring.identity import join_ring
from grafting.ring.layout import NetworkFiles, SharedFolder
from grafting.train.cli import parse_config
from grafting.train.config import CifarConfig, RunConfig
from grafting.train.files import (
    foreign_exchange_files,
    load_last,
    prepare_run_files,
    read_saved_config,
    save_best,
    save_last,
)
from grafting.train.runtime import available_cores, choose_device, configure_threads

META = {"model": "tiny", "num_classes": 2}


def tiny_model(seed: int = 0) -> nn.Module:
    """A conv, a BatchNorm and a linear layer: every kind of entry a real network has, in a few numbers."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    return dict(tiny_model(seed).state_dict())


def cifar_config(shared: Path, *flags: str) -> CifarConfig:
    return parse_config(CifarConfig, ["--s", str(shared), "--model", "resnet20", *flags], prog="t", description="")


# ----------------------------------------------------------------------------------------------
# The ring's identity


def test_the_first_network_creates_the_ring_and_the_others_join_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = SharedFolder(tmp_path)
    names: list[str] = []
    threads = [threading.Thread(target=lambda: names.append(join_ring(folder))) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(names)) == 1 and re.fullmatch(r"[0-9a-f]{12}", names[0]), names
    assert json.loads(folder.ring.read_text())["ring"] == names[0]
    # A resumed network recreates a deleted ring.json under its recorded name, and refuses another one.
    folder.ring.unlink()
    assert join_ring(folder, expected="abc123abc123") == "abc123abc123"
    with pytest.raises(
        GraftingError, match="this network belongs to ring 0123 .* names ring abc123abc123: another run"
    ):
        join_ring(folder, expected="0123")
    folder.ring.write_text("{garbled")
    monkeypatch.setattr("grafting.ring.identity._WRITE_GRACE_S", 0.1)  # not being written: no need to wait
    with pytest.raises(GraftingError, match="ring.json is unreadable .*move it away"):
        join_ring(folder)


def test_every_exchange_file_and_config_json_records_the_ring(tmp_path: Path) -> None:
    with Grafter(tmp_path, 1, 2, meta=META) as grafter:
        path = grafter.publish(tiny_model(), 1)
        files = prepare_run_files(cifar_config(tmp_path, "--num", "2", "--i", "1"), grafter.ring)
    assert read_exchange_file(path)[1]["ring"] == grafter.ring
    assert json.loads(files.config.read_text())["ring"] == grafter.ring


def test_a_peer_file_of_another_ring_is_refused_saying_what_to_do(tmp_path: Path) -> None:
    old = Exchange(tmp_path / "old", 2, 2)
    old.acquire()
    old.publish(1, weights(), META)
    old.release()
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with Grafter(tmp_path / "new", 1, 2, meta=META) as grafter:
        grafter.publish(model, 1)
        os.replace(old.path(2, 1), tmp_path / "new" / "net2_epoch1.tensors")  # an earlier run's file, copied in
        with pytest.raises(PeerMismatchError) as caught:
            grafter.graft(model, 1)
    assert one_line(str(caught.value)).endswith(
        f"move it away and restart this network from its last checkpoint with Grafter(..., ring='{grafter.ring}'), "
        f"or start this ring in a new root folder"
    )
    assert f"belongs to another run (ring {old.ring}, this ring is {grafter.ring})" in str(caught.value)
    assert same_weights(model, before)


def test_a_fresh_start_refuses_exchange_files_this_ring_cannot_have_written(tmp_path: Path) -> None:
    """The reproduction: a finished run's folder copied, its net1/, net2/ and tb/ deleted, a new ring started."""
    with Exchange(tmp_path, 2, 2) as old:
        for epoch in (1, 2, 3):
            old.publish(epoch, weights(), META)
    (tmp_path / "net1_epoch3.tensors").write_bytes((tmp_path / "net2_epoch3.tensors").read_bytes())
    config = cifar_config(tmp_path, "--num", "2", "--i", "1")
    ring = join_ring(SharedFolder(tmp_path))  # the copied ring.json: the new ring joins it
    with pytest.raises(GraftingError) as caught:
        prepare_run_files(config, ring)
    message = one_line(str(caught.value))
    assert message == (
        f"{tmp_path} holds exchange files this ring cannot have written: net1_epoch3.tensors (network 1 "
        f"cannot be at epoch 3 before network 1 has finished epoch 1); net2_epoch1.tensors, net2_epoch2.tensors, "
        f"net2_epoch3.tensors (network 2 has no config.json); they are another run's: move them away, or "
        f"start this ring in a new --s"
    )
    assert not (tmp_path / "net1").exists(), "a refused start writes no run files"

    # Network 2 of the new ring has started (its config.json names the ring): still, it cannot be more than
    # one epoch ahead of a network 1 that has not finished epoch 1.
    peer = NetworkFiles(tmp_path, 2)
    peer.folder.mkdir()
    peer.config.write_text(json.dumps({"ring": ring}))
    foreign = [path.name for path, _ in foreign_exchange_files(config, ring)]
    assert foreign == ["net1_epoch3.tensors", "net2_epoch3.tensors"]
    # Following the advice literally (moving them away) lets the ring start.
    for name in foreign:
        os.replace(tmp_path / name, tmp_path.parent / f"{tmp_path.name}-{name}")
    prepare_run_files(config, ring)


# ----------------------------------------------------------------------------------------------
# What a peer file must be


def test_a_peer_of_another_architecture_is_refused_without_meta(tmp_path: Path) -> None:
    """The README's own-loop Grafter has no meta=: a deeper network's weights (extra keys) must never be
    grafted (the reproduction used resnet34 into resnet18; the CIFAR ResNets are the same case, smaller)."""
    mine, theirs = cifar_models.create("resnet20", num_classes=10), cifar_models.create("resnet32", num_classes=10)
    before = {k: v.clone() for k, v in mine.state_dict().items()}
    with Grafter(tmp_path, 1, 2) as one, Grafter(tmp_path, 2, 2) as two:
        two.publish(theirs, 1)
        one.publish(mine, 1)
        with pytest.raises(
            PeerMismatchError,
            match=r"network 2's file .*net2_epoch1\.tensors has an entry 'layer1\.3\."
            r"conv1\.weight' that the architecture lacks; all networks of a "
            r"ring must be the same architecture",
        ):
            one.graft(mine, 1)
    assert same_weights(mine, before)


BAD_PEER_FILES = {
    # case: (how the peer's file is spoiled, what the reader says)
    "int64 weights": (
        lambda state, meta: ({k: v.long() for k, v in state.items()}, meta),
        "has dtype torch.int64 for '0.weight' where a floating dtype (torch.float32) is expected",
    ),
    "x1e30 weights": (
        lambda state, meta: ({k: v * 1e30 if v.is_floating_point() else v for k, v in state.items()}, meta),
        "holds values up to",
    ),
    "inf weight": (
        lambda state, meta: ({**state, "3.bias": torch.tensor([0.0, float("inf")])}, meta),
        "holds NaN or infinite values (3.bias)",
    ),
    "extra key": (
        lambda state, meta: ({**state, "4.weight": torch.zeros(2)}, meta),
        "has an entry '4.weight' that the architecture lacks",
    ),
    "missing key": (
        lambda state, meta: ({k: v for k, v in state.items() if k != "3.bias"}, meta),
        "has no entry '3.bias'",
    ),
    "meta of another epoch": (
        lambda state, meta: (state, {**meta, "epoch": 7}),
        "says it holds network 2's epoch 7: it was renamed or copied by hand",
    ),
    "meta of another network": (lambda state, meta: (state, {**meta, "net": 3}), "says it holds network 3's epoch 1"),
    "no meta": (lambda state, meta: (state, None), "has no metadata, so this project did not write it"),
}


@pytest.mark.parametrize("case", sorted(BAD_PEER_FILES))
def test_bad_peer_files_are_refused_and_nothing_is_grafted(tmp_path: Path, case: str) -> None:
    spoil, said = BAD_PEER_FILES[case]
    model = tiny_model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with (
        Grafter(tmp_path, 1, 2, meta=META, rule="module") as one,
        Grafter(tmp_path, 2, 2, meta=META, rule="module") as two,
    ):
        path = two.publish(tiny_model(1), 1)
        state, meta = spoil(*read_exchange_file(path))
        exchange_file.pack(state, meta or {}).write(path)
        one.publish(model, 1)
        with pytest.raises(GraftingError) as caught:
            one.graft(model, 1)
    message = one_line(str(caught.value))
    assert said in message and str(path) in message, message
    assert same_weights(model, before), "nothing may be grafted from a refused file"
    if case == "x1e30 weights":
        assert f"more than {MAGNITUDE_RATIO:g} times this network's" in message


class _Masked(nn.Module):
    """A model with a large constant buffer, like an attention mask filled with -1e9."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.register_buffer("mask", torch.full((2, 2), -1e9))


def test_large_values_pass_when_this_network_has_them_too(tmp_path: Path) -> None:
    """The magnitude check is relative to this network's own tensor: large constants are not divergence."""
    mine, theirs = _Masked(), _Masked()
    with Grafter(tmp_path, 1, 2, rule="module") as one, Grafter(tmp_path, 2, 2, rule="module") as two:
        two.publish(theirs, 1)
        assert one.step(mine, 1).grafted
    assert torch.equal(mine.mask, torch.full((2, 2), -1e9))


def test_a_fifo_as_peer_file_checkpoint_or_heartbeat_never_blocks(tmp_path: Path) -> None:
    started = time.monotonic()
    fifo = tmp_path / "net2_epoch1.tensors"
    with Grafter(tmp_path, 1, 2, meta=META, peer_timeout=30) as grafter:
        os.mkfifo(fifo)
        with pytest.raises(CheckpointError, match="is not a regular file"):
            load_file(fifo)
        with pytest.raises(CheckpointError, match=re.escape(f"{fifo} is not a regular file")):
            grafter.step(tiny_model(), 1)
    files = NetworkFiles(tmp_path, 1)
    files.folder.mkdir()
    os.mkfifo(files.last)
    with pytest.raises(CheckpointError, match="last.pt is not a regular file"):
        resume(files)
    os.mkfifo(tmp_path / "net2.alive")  # a heartbeat that cannot be written: a warning, no hang
    with Exchange(tmp_path, 2, 2):
        pass
    assert time.monotonic() - started < 10


# ----------------------------------------------------------------------------------------------
# The exchange-file protocol


def test_a_network_waiting_says_within_seconds_what_it_waits_for(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    virtual_clock(monkeypatch)
    reader = Exchange(tmp_path, 1, 2, poll_interval=0.02, notice_after=0.2, stale_after=0.5)
    alive, target = tmp_path / "net2.alive", tmp_path / "net2_epoch1.tensors"

    def said_while_waiting() -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="grafting.ring.exchange"):
            with pytest.raises(PeerTimeoutError):
                reader.wait_for(2, 1, timeout=0.35)
        lines = [record.getMessage() for record in caplog.records]
        assert lines and all(
            line.startswith(f"net 1: waiting for network 2's epoch 1 ({target}) for 0s; ") for line in lines
        ), lines
        return [line.split("for 0s; ")[1] for line in lines]

    assert said_while_waiting() == [f"network 2 has not started yet (no heartbeat file {alive})"]
    alive.write_text("now")
    assert said_while_waiting() == ["network 2 is running (heartbeat 0s ago)"]
    a_second_ago = time.time() - 1  # network 2 stopped a second ago: older than stale_after
    os.utime(alive, (a_second_ago, a_second_ago))
    resume = "from its last checkpoint with Grafter(..., ring=<the grafter.ring it saved>)"
    stopped = f"network 2 has stopped: its heartbeat {alive} is 1s old; check its log and restart it {resume}"
    assert said_while_waiting() == [stopped, stopped], "said at once, and again at the notice"
    alive.unlink()
    (tmp_path / "net2").mkdir()
    assert said_while_waiting() == [
        f"network 2 is not running (no heartbeat file {alive}; it finished or stopped): restart it {resume}"
    ]


@pytest.mark.e2e
def test_own_loop_grafter_says_it_waits_without_any_logging_set_up(tmp_path: Path) -> None:
    script = (
        "import logging, sys, torch\n"
        "from grafting import Grafter\n"
        "with Grafter(sys.argv[1], net=1, num=2, peer_timeout=7) as g:\n"
        "    g.step(torch.nn.Linear(2, 2), 1)\n"
    )
    run = popen_forked(
        [sys.executable, "-c", script, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 1, stderr
    waiting = [line for line in stderr.splitlines() if line.startswith("grafting: net 1: waiting")]
    assert (
        waiting
        and f"network 2's epoch 1 ({tmp_path / 'net2_epoch1.tensors'}) for 5s; network 2 has not started "
        f"yet (no heartbeat file {tmp_path / 'net2.alive'})"
        in waiting[0]
    ), stderr


def test_a_file_gone_after_its_peer_moved_on_is_skipped_not_waited_for(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The advice for a corrupt peer file is "delete it and restart this network with --resume": the
    peer never writes that epoch again, so waiting for it would hang for ever."""
    model = tiny_model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with (
        Grafter(tmp_path, 1, 2, meta=META, rule="module") as one,
        Grafter(tmp_path, 2, 2, meta=META, rule="module") as two,
    ):
        one.publish(model, 1)
        two.step(tiny_model(1), 1)
        two.publish(tiny_model(2), 2)
        (tmp_path / "net2_epoch1.tensors").unlink()
        with caplog.at_level(logging.WARNING):
            report = one.graft(model, 1)
        assert not report.grafted and same_weights(model, before)
        assert "is gone and network 2 has moved on to epoch 2: epoch 1 is not grafted" in report.skipped
        assert report.summary().startswith("epoch 1: not grafted (network 2's file of epoch 1")
        assert any("epoch 1 is not grafted" in r.getMessage() for r in caplog.records)
        assert one.step(model, 2).grafted  # and the ring goes on
        # A file still to come (no later epoch published) is waited for, as before.
        clock = virtual_clock(monkeypatch)
        one.peer_timeout = 0.3
        with pytest.raises(PeerTimeoutError):
            one.step(model, 3)
        assert clock.now == pytest.approx(0.3)


def test_a_restarted_network_first_removes_its_files_of_the_epochs_to_come_newest_first(tmp_path: Path) -> None:
    with Grafter(tmp_path, 2, 3, meta=META) as grafter:
        for epoch in (1, 2, 3, 4):
            grafter.exchange.publish(epoch, weights(), META)
        removed = grafter.discard_from(3)
    assert [p.name for p in removed] == ["net2_epoch4.tensors", "net2_epoch3.tensors"]
    assert sorted(p.name for p in tmp_path.glob("net2_epoch*.tensors")) == [
        "net2_epoch1.tensors",
        "net2_epoch2.tensors",
    ]


def ring_folder_after(
    tmp_path: Path, *, num: int, source: str, finished: list[int], keep_all: bool = False, epochs: int = 4
) -> list[str]:
    """Networks 1..num publish and graft ``epochs`` epochs; those in ``finished`` then finish, the others
    stay open (still running); returns the files left in the folder."""
    grafters = [
        Grafter(tmp_path, net, num, meta=META, rule="module", source=source, keep_all=keep_all)
        for net in range(1, num + 1)
    ]
    models = [tiny_model(net) for net in range(1, num + 1)]
    for grafter in grafters:
        grafter.open()
    for epoch in range(1, epochs + 1):
        for grafter, model in zip(grafters, models):
            grafter.publish(model, epoch)
        for grafter, model in zip(grafters, models):
            grafter.graft(model, epoch)
    for net in finished:
        grafters[net - 1].finish()
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "ring.json")
    for grafter in grafters:
        grafter.close()
    return left


def test_a_finished_network_removes_its_predecessors_files_its_heartbeat_and_its_lock(tmp_path: Path) -> None:
    # Network 2 finished: network 1's files are gone (network 2 was their only reader); its own stay for
    # network 3, which still runs.
    left = ring_folder_after(tmp_path / "one", num=3, source="external", finished=[2])
    assert left == [
        "net1.alive",
        "net1.lock",
        "net2_epoch1.tensors",
        "net2_epoch2.tensors",
        "net2_epoch3.tensors",
        "net2_epoch4.tensors",
        "net3.alive",
        "net3.lock",
        "net3_epoch1.tensors",
        "net3_epoch2.tensors",
        "net3_epoch3.tensors",
        "net3_epoch4.tensors",
    ]
    assert ring_folder_after(tmp_path / "all", num=3, source="external", finished=[1, 2, 3]) == []
    assert ring_folder_after(tmp_path / "keep", num=2, source="external", finished=[1, 2], keep_all=True, epochs=2) == [
        "net1_epoch1.tensors",
        "net1_epoch2.tensors",
        "net2_epoch1.tensors",
        "net2_epoch2.tensors",
    ]
    # Averaging: every network reads every file; the first to finish removes what all have read and could
    # need after a resume, the last one the rest.
    left = ring_folder_after(tmp_path / "avg", num=2, source="average", finished=[1])
    assert left == [
        "net1_epoch3.tensors",
        "net1_epoch4.tensors",
        "net2.alive",
        "net2.lock",
        "net2_epoch3.tensors",
        "net2_epoch4.tensors",
    ]
    assert ring_folder_after(tmp_path / "avg-all", num=2, source="average", finished=[1, 2]) == []


def test_a_finished_networks_lock_can_be_taken_again_at_once(tmp_path: Path) -> None:
    first = Exchange(tmp_path, 1, 2)
    first.acquire()
    first.finish()
    assert not first.lock_path.exists() and not first.alive_path(1).exists()
    with Exchange(tmp_path, 1, 2) as second:
        assert second.lock_path.read_text().split()[0] == str(os.getpid())
        with pytest.raises(LockError, match="already being trained"):
            Exchange(tmp_path, 1, 2).acquire()


# A child that takes network 1's lock, forks a grandchild that lives on (like a DataLoader worker), and
# prints both pids.
FORK_AFTER_LOCK = """
import os, sys, time
from grafting.ring.exchange import Exchange
Exchange(sys.argv[1], 1, 2).acquire()
worker = os.fork()
if worker == 0:
    time.sleep(60)
    os._exit(0)
print(os.getpid(), worker, flush=True)
time.sleep(60)
"""


@pytest.mark.e2e
def test_the_lock_dies_with_its_process_even_when_a_forked_worker_lives_on(tmp_path: Path) -> None:
    child = popen_forked(
        [sys.executable, "-c", FORK_AFTER_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=child_env()
    )
    owner, worker = map(int, child.stdout.readline().split())
    child.stdout.close()
    try:
        os.kill(owner, signal.SIGKILL)
        child.wait(timeout=10)
        os.kill(worker, 0)  # the worker is still alive...
        with Exchange(tmp_path, 1, 2):  # ...and the lock is free at once
            pass
    finally:
        os.kill(worker, signal.SIGKILL)


# ----------------------------------------------------------------------------------------------
# Resuming


def train_state(files: NetworkFiles, epoch: int, *, graft_step_done: bool = True, seed: int = 0) -> nn.Module:
    """Save a tiny run's checkpoint of ``epoch`` (weights = the epoch number, so a restored model tells
    which checkpoint it came from)."""
    model = tiny_model(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float(epoch))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    files.folder.mkdir(parents=True, exist_ok=True)
    save_last(
        files,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=None,
        epoch=epoch,
        best_acc=10.0,
        acc=10.0,
        graft_step_done=graft_step_done,
    )
    return model


def resume(files: NetworkFiles, num: int = 1):
    """Resume a tiny run from ``files`` (the random generators as they were); returns the resume state and
    the value the weights were restored to."""
    model = tiny_model(5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    generators = capture_rng_state()
    try:
        state = load_last(files, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None, num=num)
    finally:
        restore_rng_state(generators)
    return state, float(next(model.parameters()).detach().flatten()[0])


def test_last_pt_keeps_its_predecessor_and_an_unusable_one_falls_back_to_it(tmp_path: Path) -> None:
    files = NetworkFiles(tmp_path, 1)
    for epoch in (1, 2, 3):
        train_state(files, epoch)
    assert load_file(files.previous)["epoch"] == 2 and load_file(files.last)["epoch"] == 3
    content = files.last.read_bytes()
    files.last.write_bytes(content[: len(content) // 3])
    state, restored = resume(files)
    assert (state.start_epoch, restored) == (3, 2.0), "resumed from previous.pt, epoch 2"
    assert files.set_aside(files.last).read_bytes() == content[: len(content) // 3], "kept for inspection"
    assert not files.last.exists()
    train_state(files, 3)  # the next save does not turn the unusable file into the fallback
    assert load_file(files.previous)["epoch"] == 2


HAND_EDITS = {
    # case: (change to the saved dict, what the warning says)
    "epoch text": (lambda s: s.update(epoch="five"), "records epoch 'five', not a finished epoch"),
    "epoch 0": (lambda s: s.update(epoch=0), "records epoch 0"),
    "best nan": (lambda s: s.update(best_acc=float("nan")), "accuracies that are not finite"),
    "weights x1e30": (lambda s: s["model"].update({k: v * 1e30 for k, v in s["model"].items()}), "holds values up to"),
    "no optimizer": (lambda s: s.pop("optimizer"), "does not fit this run (KeyError: 'optimizer')"),
    "rng garbage": (lambda s: s.update(rng={"python": 3}), "does not fit this run (TypeError"),
    "other model": (
        lambda s: s.update(model=dict(cifar_models.create("resnet20", num_classes=2).state_dict())),
        "has no entry '0.weight'",
    ),
    "not ours": (lambda s: s.update(format="other"), "is not a resumable checkpoint of this project"),
}


@pytest.mark.parametrize("case", sorted(HAND_EDITS))
def test_a_hand_edited_last_pt_is_never_resumed_from(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    edit, said = HAND_EDITS[case]
    files = NetworkFiles(tmp_path, 1)
    train_state(files, 1)
    train_state(files, 2)
    state = torch.load(files.last, weights_only=True)
    edit(state)
    torch.save(state, files.last)
    with caplog.at_level(logging.WARNING):
        resumed, restored = resume(files)
    assert (resumed.start_epoch, restored) == (2, 1.0)
    assert any(said in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_resume_never_restarts_at_epoch_1_over_later_work(tmp_path: Path) -> None:
    files = NetworkFiles(tmp_path, 1)
    model = train_state(files, 1)
    train_state(files, 2)
    save_best(files, model, 2, 50.0)
    # Both checkpoints unusable, or deleted as an old error message advised: never a silent epoch 1.
    files.last.write_bytes(b"garbage")
    files.previous.write_bytes(b"garbage")
    with pytest.raises(CheckpointError) as caught:
        resume(files)
    message = one_line(str(caught.value))
    assert "network 1 has no usable checkpoint (" in message and "although it reached epoch 2" in message, message
    assert message.endswith(f"to train it again from epoch 1, move {files.folder} away and start without --resume")
    files.last.unlink()
    files.previous.unlink()
    with pytest.raises(
        CheckpointError,
        match=r"last.pt is missing; previous.pt is missing\) although it reached "
        r"epoch 2 \(best.pt of epoch 2\).*restore .*last.pt from a backup, or "
        r"start the ring again in a new --s",
    ):
        resume(files, num=2)
    files.best.unlink()
    (tmp_path / "net1_epoch3.tensors").write_bytes(b"x")  # an exchange file of a later epoch says the same
    with pytest.raises(CheckpointError, match=r"reached epoch 3 \(net1_epoch3.tensors\)"):
        resume(files, num=2)
    (tmp_path / "net1_epoch3.tensors").unlink()
    # Killed in epoch 1 (its best.pt and exchange file of epoch 1 exist): epoch 1 again, nothing lost.
    save_best(files, model, 1, 50.0)
    (tmp_path / "net1_epoch1.tensors").write_bytes(b"x")
    assert resume(files, num=2)[0].start_epoch == 1


def test_a_fresh_start_never_overwrites_a_run_that_got_further(tmp_path: Path) -> None:
    config = cifar_config(tmp_path)
    files = prepare_run_files(config)
    save_best(files, tiny_model(), 3, 50.0)  # last.pt was deleted
    with pytest.raises(
        GraftingError,
        match=r"net1 holds a run that reached epoch 3 \(best.pt of epoch 3\); pass "
        r"--resume to continue it, or use another --s",
    ):
        prepare_run_files(config)


CONFIG_DAMAGE = {
    # case: (what config.json becomes; None deletes it, what the error says)
    "missing": (
        None,
        "config.json is missing, so the settings this run must keep cannot be checked; restore it from "
        "a backup, or start a new run in another --s",
    ),
    "a list": ("[]", "holds a JSON list, not the settings object"),
    "garbled": ('{"a": 0.4,', "is not valid JSON"),
    "no format": ('{"a": 0.4}', "has format None"),
    "a directory": ("<dir>", "is not a regular file"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_DAMAGE))
def test_resume_without_a_readable_config_json_says_how_to_go_on(tmp_path: Path, case: str) -> None:
    content, said = CONFIG_DAMAGE[case]
    files = prepare_run_files(cifar_config(tmp_path))
    train_state(files, 1)
    files.config.unlink()
    if content == "<dir>":
        files.config.mkdir()
    elif content is not None:
        files.config.write_text(content)
    with pytest.raises(UsageError) as caught:
        read_saved_config(cifar_config(tmp_path, "--resume", "--lr", "0.01", "--seed", "9"))
    message = one_line(str(caught.value))
    assert message.startswith(f"--resume: {files.config} ") and said in message, message


def test_config_json_with_a_missing_setting_or_another_ring_is_refused(tmp_path: Path) -> None:
    files = prepare_run_files(cifar_config(tmp_path), "ring0ring0ri")
    train_state(files, 1)
    saved = json.loads(files.config.read_text())
    del saved["a"]
    files.config.write_text(json.dumps(saved))
    with pytest.raises(UsageError, match="does not record --a"):
        read_saved_config(cifar_config(tmp_path, "--resume"))
    saved["a"], saved["ring"] = 0.4, 7
    files.config.write_text(json.dumps(saved))
    with pytest.raises(UsageError, match="holds ring 7, not a ring's name"):
        read_saved_config(cifar_config(tmp_path, "--resume"))


def test_a_config_json_from_before_a_setting_existed_resumes_as_that_version_trained(tmp_path: Path) -> None:
    filter_level = ("--level", "filter")
    files = prepare_run_files(cifar_config(tmp_path, *filter_level), "ring0ring0ri")
    train_state(files, 1)
    saved = json.loads(files.config.read_text())
    del saved["filter_bn_blend"]  # what a version before the setting wrote
    files.config.write_text(json.dumps(saved))
    assert read_saved_config(cifar_config(tmp_path, "--resume", *filter_level)) is not None
    with pytest.raises(UsageError, match="--filter-bn-blend was 'per-channel' in .* but is 'repeated-whole' now"):
        read_saved_config(cifar_config(tmp_path, "--resume", *filter_level, "--filter-bn-blend", "repeated-whole"))


def test_what_peers_must_share_is_fixed_on_resume_except_the_epochs() -> None:
    """A setting peers must agree on but that may change on resume would split a ring; --epochs alone may,
    because extending a ring means resuming every network with the new value."""
    for config in (RunConfig, CifarConfig):
        assert set(config.shared_by_peers()) - set(config.fixed_on_resume()) == {"epochs"}


# ----------------------------------------------------------------------------------------------
# Bad values, one line each


def _lock_is_a_directory(shared: Path) -> None:
    (shared / "net1.lock").mkdir(parents=True)


def _read_only(shared: Path) -> Path:
    """An existing folder this process cannot write into (root writes anywhere but into /sys)."""
    if os.geteuid() == 0:
        return Path("/sys")
    shared.mkdir()
    shared.chmod(0o555)
    return shared


BAD_VALUES = {
    # case: (action raising a GraftingError, text of the one line)
    "Grafter(a=5)": (lambda p: Grafter(p, 1, 2, a=5), "a must lie in [0, 1], got 5"),
    "Grafter(a=nan)": (lambda p: Grafter(p, 1, 2, a=float("nan")), "a must lie in [0, 1], got nan"),
    "Grafter(c=inf)": (lambda p: Grafter(p, 1, 2, c=float("inf")), "c must be a finite number"),
    "step(epoch=1.5)": (lambda p: Grafter(p, 1, 2).step(tiny_model(), 1.5), "epoch must be a whole number >= 1"),
    "graft(epoch=0)": (lambda p: Grafter(p, 1, 2).graft(tiny_model(), 0), "got 0"),
    "publish(epoch=True)": (lambda p: Exchange(p, 1, 2).publish(True, weights(), META), "got True"),
    "net1.lock a directory": (
        lambda p: (_lock_is_a_directory(p), Exchange(p, 1, 2).acquire()),
        "net1.lock as network 1's lock file: is a directory; move it away",
    ),
    "read-only root": (
        lambda p: Exchange(_read_only(p), 1, 2).acquire(),
        "Permission denied; choose a writable root folder",
    ),
    "--s a file": (lambda p: (p.write_text("x"), Exchange(p, 1, 2).acquire()), "cannot create the shared directory"),
    "--s ''": (lambda p: parse_config(CifarConfig, ["--s", ""], prog="t", description=""), "--s is empty"),
    "--seed 1e23": (lambda p: cifar_config(p, "--seed", "99999999999999999999999"), "--seed must lie in"),
    "--kd-weight nan": (lambda p: cifar_config(p, "--kd-weight", "nan"), "--kd-weight must be >= 0 and finite"),
    "--kd-temperature inf": (lambda p: cifar_config(p, "--kd-temperature", "inf"), "--kd-temperature must be"),
    "--invalid-threshold nan": (lambda p: cifar_config(p, "--invalid-threshold", "nan"), "--invalid-threshold"),
    "--device mps": (lambda p: choose_device("mps"), "--device mps: Apple's MPS is not available"),
    "--device meta": (lambda p: choose_device("meta"), "--device meta: this project trains on cpu, cuda or cuda:N"),
    "--device ''": (lambda p: choose_device(""), "--device '' is not a device"),
    "tb a file": (
        lambda p: ((p / "tb").parent.mkdir(), (p / "tb").write_text("x"), prepare_run_files(cifar_config(p))),
        "tb is a file, not a folder; the run writes TensorBoard events there: move it away",
    ),
    "net1 a file": (
        lambda p: (p.mkdir(), (p / "net1").write_text("x"), prepare_run_files(cifar_config(p))),
        "net1 is a file, not a folder",
    ),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_are_one_line_errors(tmp_path: Path, case: str) -> None:
    action, said = BAD_VALUES[case]
    if case == "--device mps" and torch.backends.mps.is_available():
        pytest.skip("MPS is available here")
    shared = tmp_path / "s"
    with pytest.raises(GraftingError) as caught:
        action(shared)
    message = one_line(str(caught.value))
    assert said in message, message


def test_more_threads_than_cores_are_capped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    threads = torch.get_num_threads()
    try:
        with caplog.at_level(logging.WARNING):
            used = configure_threads(100000, 1, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert used == available_cores()
    assert f"--threads 100000 is more than the {available_cores()} cores" in caplog.text


def test_cifar_labels_out_of_range_are_refused_at_load(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path, 10, train_size=20, test_size=10)
    set_cifar_label(tmp_path / "cifar-10-batches-py" / "test_batch", 3, 12)
    with pytest.raises(DatasetNotFoundError) as caught:
        load_cifar(tmp_path, 10)
    message = one_line(str(caught.value))
    assert "CIFAR-10 test files in" in message and "hold label 12, outside 0..9" in message, message


# ----------------------------------------------------------------------------------------------
# Processes: the README's own loop


@pytest.mark.e2e
def test_readme_own_loop_says_what_it_waits_for_when_its_peer_never_starts(tmp_path: Path) -> None:
    argv = [sys.executable, str(OWN_LOOP_EXAMPLE), "runs/own-loop", "1", "2"]
    copy = start_process(argv, tmp_path, "copy1", fork=True)
    said = "grafting: net 1: waiting for network 2's epoch 1"
    wait_until(lambda: said in copy.stderr, "the waiting line", [copy], timeout=240)
    line = next(line for line in copy.stderr.splitlines() if said in line)
    assert "for 5s; network 2 has not started yet (no heartbeat file runs/own-loop/net2.alive)" in line, line
    assert "(runs/own-loop/net2_epoch1.tensors)" in line, line  # the folder as the example names it
    copy.process.kill()
    finish([copy])
