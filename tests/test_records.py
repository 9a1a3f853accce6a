"""Records and labels that must stay true across starts and networks: the
generated-stand-in label of a ring and of a resumed run, one metrics.jsonl record (and one TensorBoard
point) per epoch after a kill, and the record of the epoch a ring extension grafts.

Everything runs the CIFAR script's ``main`` in this process on a tiny generated CIFAR; the networks of
a ring run in threads of this process (the stop-signal handlers are main-thread only, and these tests
send none). A kill between two writes is stood in for by an exception raised from the second writer:
it leaves the files exactly as a ``kill -9`` at that instant does.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers import exit_code_of, run_script_here, script_state, tensorboard_clock_a_second_on

from grafting.data.fake import MARKER_NAME, write_fake_cifar
from grafting.ring.layout import NetworkFiles
from grafting.tools.summary import main as summary_main
from grafting.train.report import read_metrics

TRAIN_IMAGES, TEST_IMAGES, BATCH = 16, 16, 16  # one batch an epoch: what these tests check is per epoch


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated CIFAR-10 that carries the stand-in marker."""
    return write_fake_cifar(tmp_path_factory.mktemp("stand-in"), 10, TRAIN_IMAGES, TEST_IMAGES)


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same files without the marker: what the project takes for the real CIFAR-10."""
    root = write_fake_cifar(tmp_path_factory.mktemp("real"), 10, TRAIN_IMAGES, TEST_IMAGES)
    (root / MARKER_NAME).unlink()
    return root


def flags(
    data: Path, shared: Path, *, num: int = 1, i: int = 1, epochs: int = 2, extra: Sequence[str] = ()
) -> list[str]:
    """Network ``i`` of ``num`` on the tiny data, one CPU thread."""
    return [
        *("--data", str(data), "--s", str(shared), "--num", str(num), "--i", str(i), "--epochs", str(epochs)),
        *("--model", "resnet20", "--device", "cpu", "--threads", "1", "--seed", "3", "--print-freq", "0"),
        *("--batch-size", str(BATCH), "--test-batch-size", str(TEST_IMAGES), *extra),
    ]


def cifar_main() -> Callable[[list[str] | None], None]:
    from grafting_cifar.train import main

    return main


def exit_code(argv: list[str]) -> int:
    """Run the CIFAR script's main here; its exit code (0 when it returns)."""
    return run_script_here(cifar_main(), argv)


def train_ring(argvs: Sequence[list[str]]) -> list[int]:
    """Every network of a ring at once, each in a thread of this process; their exit codes."""
    codes: list[int] = [-1] * len(argvs)

    def one(index: int) -> None:
        codes[index] = exit_code_of(cifar_main(), argvs[index])

    threads = [threading.Thread(target=one, args=(index,)) for index in range(len(argvs))]
    with script_state():
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a network of the ring did not finish"
    return codes


def epochs_recorded(shared: Path, net: int = 1) -> list[int]:
    return [record["epoch"] for record in read_metrics(NetworkFiles(shared, net).metrics)]


def tensorboard_steps(folder: Path, tag: str) -> list[int]:
    """The steps of ``tag`` as TensorBoard shows them (a restart's purge of the repeated steps applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


# ----------------------------------------------------------------------------------------------
# the stand-in label


def test_a_ring_of_stand_in_and_real_data_is_refused_and_labelled_as_generated(
    tmp_path: Path, stand_in: Path, real: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = tmp_path / "s"
    codes = train_ring([flags(real, shared, num=2, i=1), flags(stand_in, shared, num=2, i=2)])
    err = capsys.readouterr().err
    assert codes == [1, 1], err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 2 and all("all networks of a ring must use the same generated_data" in x for x in lines), err
    assert not list(shared.glob("net*/last.pt")), "nothing may be grafted across the two kinds of data"
    # The folder's runs, as graft-summary shows them: the stand-in network marks the whole ring.
    summary_main([str(shared), "--format", "json"])
    [row] = json.loads(capsys.readouterr().out)
    assert row["generated_stand_in"] is True, row


def test_networks_that_exchange_nothing_may_mix_kinds_of_data_and_the_run_is_labelled_generated(
    tmp_path: Path, stand_in: Path, real: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shared, internal = tmp_path / "s", ("--graft-source", "internal")
    codes = train_ring(
        [
            flags(real, shared, num=2, i=1, epochs=1, extra=internal),
            flags(stand_in, shared, num=2, i=2, epochs=1, extra=internal),
        ]
    )
    assert codes == [0, 0], capsys.readouterr().err
    capsys.readouterr()
    summary_main([str(shared), "--format", "json"])
    [row] = json.loads(capsys.readouterr().out)
    assert row["generated_stand_in"] is True and row["status"] == "done", row


def test_a_stand_in_run_resumed_on_real_data_is_refused_and_keeps_its_label(
    tmp_path: Path, stand_in: Path, real: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = tmp_path / "s"
    assert exit_code(flags(stand_in, shared, epochs=1)) == 0
    config = NetworkFiles(shared, 1).config
    before = config.read_bytes()
    code = exit_code(flags(real, shared, epochs=2, extra=("--resume",)))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"--resume: {config} records a run on a GENERATED stand-in" in err, err
    assert f"--data {real} holds the real data set" in err, err
    assert config.read_bytes() == before and json.loads(before)["generated_data"] is True
    # The way out the line names works: the same kind of data.
    assert exit_code(flags(stand_in, shared, epochs=2, extra=("--resume",))) == 0
    assert epochs_recorded(shared) == [1, 2]


# ----------------------------------------------------------------------------------------------
# one record per epoch after a kill between metrics.jsonl and last.pt


class Killed(BaseException):
    """Stands in for kill -9: nothing after the point where it is raised runs."""


def killed_before_saving(epoch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on, the training loop dies right before it writes last.pt of ``epoch``."""
    from grafting.train import loop

    save_last = loop.save_last

    def dies(files: NetworkFiles, **state: Any) -> None:
        if state["epoch"] == epoch:
            raise Killed
        save_last(files, **state)

    monkeypatch.setattr(loop, "save_last", dies)


# A run that saved an epoch continues with --resume; one killed in epoch 1 starts again with --resume, with
# --resume auto (what the experiment scripts pass on every start) or without.
RESTARTS = [(1, "--resume"), (1, "--resume auto"), (1, ""), (2, "--resume")]


@pytest.mark.parametrize("killed_in, restart", RESTARTS)
def test_an_epoch_recorded_before_a_kill_is_recorded_once(
    tmp_path: Path, stand_in: Path, monkeypatch: pytest.MonkeyPatch, killed_in: int, restart: str
) -> None:
    shared = tmp_path / "s"
    killed_before_saving(killed_in, monkeypatch)
    with pytest.raises(Killed):
        cifar_main()(flags(stand_in, shared, epochs=3))
    monkeypatch.undo()
    assert epochs_recorded(shared) == list(range(1, killed_in + 1))  # the record reached the file
    tensorboard_clock_a_second_on(monkeypatch)
    assert exit_code(flags(stand_in, shared, epochs=3, extra=restart.split())) == 0
    assert epochs_recorded(shared) == [1, 2, 3]
    assert tensorboard_steps(shared / "tb" / "net1", "test/acc") == [1, 2, 3]


# ----------------------------------------------------------------------------------------------
# the record of the epoch an extended ring grafts


def test_extending_a_finished_ring_records_the_graft_of_its_old_final_epoch(
    tmp_path: Path, stand_in: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "s"
    assert train_ring([flags(stand_in, shared, num=2, i=i, epochs=2) for i in (1, 2)]) == [0, 0]
    finals = {net: read_metrics(NetworkFiles(shared, net).metrics)[-1] for net in (1, 2)}
    assert all(r["epoch"] == 2 and r["grafted"] is False and not r["alphas"] for r in finals.values()), finals
    resumed = [flags(stand_in, shared, num=2, i=i, epochs=3, extra=("--resume",)) for i in (1, 2)]
    tensorboard_clock_a_second_on(monkeypatch)
    assert train_ring(resumed) == [0, 0]
    for net, peer in ((1, 2), (2, 1)):
        records = read_metrics(NetworkFiles(shared, net).metrics)
        assert [r["epoch"] for r in records] == [1, 2, 3]
        grafted = records[1]
        assert grafted["grafted"] is True and grafted["peer"] == peer, grafted
        assert grafted["epochs"] == 3 and grafted["alphas"] and grafted["alpha_mean"] is not None, grafted
        assert grafted["graft_ms"] is not None and grafted["entropies"] and grafted["peer_entropies"]
        assert grafted["test_acc"] == finals[net]["test_acc"]  # tested before the graft: kept
        assert records[2]["grafted"] is False  # the new final epoch
        tb = shared / "tb" / f"net{net}"
        assert tensorboard_steps(tb, "graft/coefficient_mean") == [1, 2]
        assert tensorboard_steps(tb, "test/acc") == [1, 2, 3]


def test_an_extended_baseline_records_its_old_final_epoch_as_no_longer_final(tmp_path: Path, stand_in: Path) -> None:
    shared = tmp_path / "s"
    assert exit_code(flags(stand_in, shared, epochs=1)) == 0
    assert exit_code(flags(stand_in, shared, epochs=2, extra=("--resume",))) == 0
    records = read_metrics(NetworkFiles(shared, 1).metrics)
    assert [(r["epoch"], r["epochs"], r["grafted"]) for r in records] == [(1, 2, False), (2, 2, False)]
