"""The training scripts under kills, dead peers, bad files, full disks and bad flags.

Everything that involves a crash runs the CIFAR script in processes of its own (forks of the tests' warm
fork server, which run the command line as a new interpreter would) and stops them with SIGKILL at points
found by watching their log and files, so no test hook lives in the library. The
data is a small generated CIFAR (256 training / 64 test images, batch 32, ResNet-20, one thread per
process) so that the whole file runs in a few minutes on two cores.

The flag checks, and the failures that happen before training starts, call each script's ``main`` in
this process (no process per case) and run a few of them as processes too, to see the exit code and
stderr a shell sees.

A dead peer is noticed through its heartbeat file; the tests shorten the heartbeat period and the
stale bound with the environment variables ``GRAFTING_HEARTBEAT_S`` and ``GRAFTING_STALE_S``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from helpers import (
    CIFAR_SCRIPT,
    IMAGENET_SCRIPT,
    REPO,
    Proc,
    child_env,
    finish,
    kill,
    one_line,
    popen_forked,
    script_state,
    set_cifar_label,
    start_script,
    train_ring,
    wait_until,
)

from grafting.archs import cifar_models as models
from grafting.checkpoint import load_file
from grafting.data.fake import is_generated_stand_in, write_fake_cifar, write_fake_imagefolder
from grafting.ring import exchange_file
from grafting.ring.exchange import Exchange
from grafting.ring.exchange_file import read as read_exchange_file
from grafting.ring.grafter import Grafter
from grafting.ring.identity import RING_FORMAT
from grafting.ring.layout import NetworkFiles
from grafting.train.config import CifarConfig
from grafting.train.files import load_last, prepare_run_files
from grafting.train.report import read_metrics
from grafting.train.signals import STOPPED_EXIT_CODE

TRAIN_IMAGES, TEST_IMAGES, BATCH = 256, 64, 32
BATCHES = TRAIN_IMAGES // BATCH
RING_EPOCHS = 5  # long enough that the exchange cleanup removes files while networks are killed
SEED = 3


# ----------------------------------------------------------------------------------------------
# Processes


def start(
    workdir: Path,
    name: str,
    flags: list[str],
    *,
    env: dict[str, str] | None = None,
    rlimits: dict[str, tuple[int, int]] | None = None,
    ignore_signals: tuple[str, ...] = (),
) -> Proc:
    """Start the CIFAR script with ``flags``; its output goes to ``workdir/logs/<name>.out|.err``."""
    return start_script(CIFAR_SCRIPT, flags, workdir, name, env=env, rlimits=rlimits, ignore_signals=ignore_signals)


def flags_for(
    data: Path,
    shared: Path,
    *,
    num: int,
    i: int,
    epochs: int = RING_EPOCHS,
    model: str = "resnet20",
    extra: tuple[str, ...] = (),
) -> list[str]:
    """The command line of network ``i`` of ``num`` on the small data."""
    return [
        "--data",
        str(data),
        "--s",
        str(shared),
        "--num",
        str(num),
        "--i",
        str(i),
        "--epochs",
        str(epochs),
        "--model",
        model,
        "--device",
        "cpu",
        "--threads",
        "1",
        "--batch-size",
        str(BATCH),
        "--test-batch-size",
        str(TEST_IMAGES),
        "--print-freq",
        "2",
        "--seed",
        str(SEED),
        *extra,
    ]


def last_state(shared: Path, net: int) -> dict:
    """Network ``net``'s resumable checkpoint, loaded the safe way."""
    return load_file(shared / f"net{net}" / "last.pt", weights_only=True)


def digest(path: Path) -> str:
    """A file's content hash, to show it was not rewritten."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def exchange_files(shared: Path) -> set[str]:
    """The names of the per-epoch exchange files in the shared folder."""
    return {path.name for path in shared.glob("net*_epoch*.tensors")}


def temp_files(folder: Path) -> list[str]:
    """Half-written files (``*.tmp-<pid>``, ``config.json.tmp``) anywhere under ``folder``."""
    return sorted(path.name for path in folder.rglob("*.tmp*"))


def assert_same_weights(shared: Path, reference: Path, nets: tuple[int, ...] = (1, 2)) -> None:
    """The final weights (``last.pt``'s model) of each network equal the reference run's, bit for bit."""
    for net in nets:
        got, want = last_state(shared, net), last_state(reference, net)
        assert got["epoch"] == want["epoch"] == RING_EPOCHS
        assert got["model"].keys() == want["model"].keys()
        differing = [key for key in want["model"] if not torch.equal(got["model"][key], want["model"][key])]
        assert not differing, (
            f"network {net}: {len(differing)} tensors differ from the uninterrupted run, first {differing[:3]}"
        )


# ----------------------------------------------------------------------------------------------
# Data and the reference run


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated CIFAR-10 and CIFAR-100 in the real on-disk formats, in one folder."""
    root = tmp_path_factory.mktemp("data")
    write_fake_cifar(root, num_classes=10, train_size=TRAIN_IMAGES, test_size=TEST_IMAGES)
    write_fake_cifar(root, num_classes=100, train_size=TRAIN_IMAGES, test_size=TEST_IMAGES)
    return root


@pytest.fixture(scope="module")
def reference_ring(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    """A ring of two networks that trains RING_EPOCHS epochs without interruption; returns its --s."""
    workdir = tmp_path_factory.mktemp("reference")
    shared = workdir / "s"
    nets = train_ring(CIFAR_SCRIPT, [flags_for(data, shared, num=2, i=i) for i in (1, 2)], workdir)
    assert [net.returncode for net in nets] == [0, 0], "\n".join(net.report() for net in nets)
    return shared


# ----------------------------------------------------------------------------------------------
# Kills and resumption


@pytest.mark.e2e
@pytest.mark.slow
def test_network_killed_mid_epoch_resumes_to_the_same_weights(tmp_path: Path, data: Path, reference_ring: Path) -> None:
    shared = tmp_path / "s"
    net1 = start(tmp_path, "net1", flags_for(data, shared, num=2, i=1))
    net2 = start(tmp_path, "net2", flags_for(data, shared, num=2, i=2))
    # Kill network 2 halfway through epoch 4; the ring then runs to epoch 5, and the exchange cleanup
    # removes files around the restart, so the resumed network must find what it needs.
    halfway = f"epoch 4 [{BATCHES // 2}/{BATCHES}]"
    wait_until(lambda: halfway in net2.log, halfway, [net1, net2])
    kill(net2)
    assert last_state(shared, 2)["epoch"] == 3, net2.report()

    resumed = start(tmp_path, "net2-resumed", flags_for(data, shared, num=2, i=2, extra=("--resume",)))
    assert finish([net1, resumed]) == [0, 0], net1.report() + resumed.report()
    assert f"resumed from {shared / 'net2' / 'last.pt'}: epoch 3 done" in resumed.log
    assert "epoch 4/5 |" in resumed.log and "epoch 3/5 |" not in resumed.log
    assert_same_weights(shared, reference_ring)
    # A finished ring leaves no exchange, heartbeat or lock file behind (ring.json names it for an extension).
    for folder in (shared, reference_ring):
        assert sorted(path.name for path in folder.iterdir()) == ["net1", "net2", "ring.json", "tb"]
    assert temp_files(shared) == []


@pytest.mark.e2e
@pytest.mark.slow
def test_second_process_is_refused_and_a_network_killed_while_waiting_resumes(
    tmp_path: Path, data: Path, reference_ring: Path
) -> None:
    shared = tmp_path / "s"
    net1 = start(tmp_path, "net1", flags_for(data, shared, num=2, i=1))  # network 2 is not started yet
    wait_until(lambda: (shared / "net1_epoch1.tensors").exists(), "network 1's epoch-1 file", [net1])
    config = shared / "net1" / "config.json"
    config_before = config.read_bytes()

    duplicate = start(tmp_path, "net1-duplicate", flags_for(data, shared, num=2, i=1))
    assert finish([duplicate]) == [1], duplicate.report()
    line = one_line(duplicate.stderr)
    assert f"network 1 in {shared} is already being trained by pid {net1.process.pid}" in line, line
    assert config.read_bytes() == config_before, "the refused process must not touch the run's files"

    # Network 1 has been waiting for network 2 all along; kill it there. It never finished epoch 1.
    assert net1.process.poll() is None, net1.report()
    kill(net1)
    assert not (shared / "net1" / "last.pt").exists()

    # The kernel dropped the killed owner's lock: the restarted network takes it, and the ring finishes.
    # It has only its config.json: --resume starts it again at epoch 1, checked against that file.
    restarted = start(tmp_path, "net1-resumed", flags_for(data, shared, num=2, i=1, extra=("--resume",)))
    net2 = start(tmp_path, "net2", flags_for(data, shared, num=2, i=2))
    assert finish([restarted, net2]) == [0, 0], restarted.report() + net2.report()
    assert f"--resume: no {shared / 'net1' / 'last.pt'} yet, starting from epoch 1" in restarted.log
    assert_same_weights(shared, reference_ring)


@pytest.mark.e2e
def test_dead_peer_is_reported_stale_then_times_out_with_checkpoints_intact(tmp_path: Path, data: Path) -> None:
    shared = tmp_path / "s"
    env = child_env(GRAFTING_HEARTBEAT_S="0.2", GRAFTING_STALE_S="1.5")
    extra = ("--peer-timeout", "6")
    net1 = start(tmp_path, "net1", flags_for(data, shared, num=2, i=1, epochs=3, extra=extra), env=env)
    net2 = start(tmp_path, "net2", flags_for(data, shared, num=2, i=2, epochs=3, extra=extra), env=env)
    # Network 1 dies right after publishing epoch 1: network 2 grafts epoch 1, then waits for epoch 2 in vain.
    wait_until(lambda: (shared / "net1_epoch1.tensors").exists(), "network 1's epoch-1 file", [net1, net2])
    kill(net1)

    waiting_since = wait_until(lambda: (shared / "net2_epoch2.tensors").exists(), "network 2's epoch-2 file", [net2])
    stale = f"waiting for network 1's epoch 2 ({shared / 'net1_epoch2.tensors'}) for "
    warned_at = wait_until(lambda: stale in net2.log or net2.process.poll() is not None, "the stale warning", [])
    assert finish([net2], timeout=60) == [1], net2.report()
    exited_at = time.monotonic()

    assert stale in net2.log and "network 1 has stopped: its heartbeat" in net2.log, net2.report()
    assert exited_at - warned_at > 3.0, "the stale heartbeat must be reported well before the timeout"
    assert exited_at - waiting_since < 6 + 30, "network 2 waited far longer than --peer-timeout"
    line = one_line(net2.stderr)
    assert "network 1 did not write epoch 2 within 6 s" in line and "network 1 has stopped" in line, line
    assert line.endswith("this network's checkpoints are intact: restart it with --resume as well"), line
    # What network 2 had saved is intact: its last checkpoint (epoch 1, grafted) and its own exchange file.
    assert last_state(shared, 2)["epoch"] == 1
    assert read_exchange_file(shared / "net2_epoch2.tensors")[1]["epoch"] == 2
    assert temp_files(shared) == []


@pytest.mark.e2e
def test_killed_during_save_leaves_the_old_or_the_new_checkpoint(tmp_path: Path) -> None:
    """A writer that saves last.pt in a loop is killed at random instants, mostly inside a save."""
    writer_source = """
import itertools, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from grafting.archs import cifar_models as models
from grafting.ring.layout import NetworkFiles
from grafting.train.files import save_last
model = models.create("resnet110", num_classes=10)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
files = NetworkFiles(Path(sys.argv[1]), 1)
files.folder.mkdir(parents=True, exist_ok=True)
print("saving", flush=True)
for epoch in itertools.count(int(sys.argv[2])):
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float(epoch))
    save_last(files, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None, epoch=epoch, best_acc=0.0)
"""
    files = NetworkFiles(tmp_path, 1)
    chance = random.Random(8)
    interrupted_saves, rounds, leftovers = 0, 0, set()
    # About two kills in three land inside a save; go on until one has (almost surely within 10 rounds).
    while rounds < 3 or (interrupted_saves == 0 and rounds < 10):
        rounds += 1
        first = 1000 * rounds
        writer = popen_forked(
            [sys.executable, "-c", writer_source, str(tmp_path), str(first)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        assert writer.stdout.readline().strip() == "saving", writer.stderr.read()
        time.sleep(chance.uniform(0.3, 1.0))
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=30)
        writer.stdout.close()
        writer.stderr.close()
        found = set(temp_files(files.folder))
        interrupted_saves += bool(found - leftovers)  # each writer's temporary file has its own pid
        leftovers |= found
        if not files.last.exists():
            assert rounds == 1, "a complete last.pt, once written, must never disappear"
            continue  # killed inside the very first save: there is no previous file yet

        # last.pt is complete and self-consistent: every weight holds the epoch it was saved with.
        model = models.create("resnet110", num_classes=10)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        state = load_last(files, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None, restore_rng=False)
        saved_epoch = state.start_epoch - 1
        assert first - 1000 <= saved_epoch < first + 1000, saved_epoch
        assert all(torch.all(p == float(saved_epoch)) for p in model.parameters()), saved_epoch
    assert interrupted_saves > 0, "no kill landed inside a save; the test proved nothing"

    # The next owner of the network removes the half-written files when it prepares its run files.
    files.last.unlink()  # keep the settings check out of this test: only the clean-up matters
    files.previous.unlink(missing_ok=True)
    prepare_run_files(CifarConfig(s=str(tmp_path), model="resnet110"))
    assert temp_files(files.folder) == []


# ----------------------------------------------------------------------------------------------
# Peers that do not fit, bad peer files


MISMATCHES = {
    # case: (network 1's settings, network 2's settings, what network 2 is told about network 1's file)
    "model": ({"num": 2, "model": "resnet20"}, {"num": 2, "model": "resnet32"}, "model=resnet20"),
    "classes": ({"num": 2, "extra": ("--cifar", "10")}, {"num": 2, "extra": ("--cifar", "100")}, "dataset=cifar10"),
    "num": ({"num": 2}, {"num": 3}, "num=2"),
    "a": ({"num": 2, "extra": ("--a", "0.4")}, {"num": 2, "extra": ("--a", "0.2")}, "a=0.4"),
    # Different --epochs would leave one network waiting for ever once the other has finished.
    "epochs": ({"num": 2, "epochs": 3}, {"num": 2, "epochs": 2}, "epochs=3"),
}


@pytest.mark.e2e
def test_peers_that_do_not_match_fail_at_the_first_exchange(tmp_path: Path, data: Path) -> None:
    started = {}
    for case, (settings1, settings2, _) in MISMATCHES.items():
        shared = tmp_path / case
        # All six processes at once: each pair fails at its first exchange, so this is mostly start-up time.
        started[case] = (
            shared,
            [
                start(tmp_path, f"{case}-net{i}", flags_for(data, shared, i=i, **{"epochs": 2, **settings}))
                for i, settings in ((1, settings1), (2, settings2))
            ],
        )
    for case, (shared, nets) in started.items():
        codes = finish(nets)
        assert codes == [1, 1], f"{case}: " + "\n".join(net.report() for net in nets)
        for net in nets:
            line = one_line(net.stderr)
            assert "file" in line and "all networks of a ring must use the same" in line, line
            assert not re.search(r"epoch 1/\d \|", net.log), f"{case}: {net.name} went on after the exchange"
        told = one_line(nets[1].stderr)
        assert f"network 1's file {shared / 'net1_epoch1.tensors'} has {MISMATCHES[case][2]}" in told, told
        if case == "epochs":
            assert told.endswith("(to extend a finished ring, resume every network with --resume --epochs N)"), told
        # Nothing was mixed: no network saved a grafted state.
        assert not list(shared.glob("net*/last.pt")), case


class _MakesDirectoryWhenLoaded:
    """Unpickling this (without weights_only) calls os.mkdir: a stand-in for a malicious checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return os.mkdir, (str(self.path),)


def started_network(data: Path, shared: Path, net: int, num: int, epochs: int) -> Grafter:
    """The shared folder as network ``net`` of the CIFAR script leaves it after its start (the ring joined,
    its config.json written), and a Grafter that publishes what that network would. Holds the lock:
    close it when done."""
    from grafting_cifar.train import parse_args

    config = parse_args(flags_for(data, shared, num=num, i=net, epochs=epochs))
    config = config.replace(graft_rule="name", generated_data=is_generated_stand_in(data))  # as the script does
    grafter = Grafter(shared, net, num, rule="name", meta=config.peer_settings())
    grafter.open()
    prepare_run_files(config, grafter.ring)
    return grafter


@pytest.mark.e2e
def test_bad_peer_files_are_named_and_never_applied(tmp_path: Path, data: Path) -> None:
    # Network 2 runs alone; network 1's epoch-1 file is put in place by the test, spoiled in four ways.
    truncated, nonfinite, malicious, bare = (
        tmp_path / name for name in ("truncated", "nonfinite", "malicious", "bare")
    )
    network1 = {
        shared: started_network(data, shared, 1, 2, epochs=2) for shared in (truncated, nonfinite, malicious, bare)
    }
    model = models.create("resnet20", num_classes=10)
    good = network1[truncated].publish(model, 1)
    good.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] = float("inf")
    network1[nonfinite].publish(model, 1)
    marker = tmp_path / "code-ran"
    torch.save({"model": _MakesDirectoryWhenLoaded(marker)}, malicious / "net1_epoch1.tensors")
    # Weights of another architecture without meta, as another tool might write them: not this project's file.
    exchange_file.pack(models.create("resnet32", num_classes=10).state_dict(), {}).write(bare / "net1_epoch1.tensors")
    for grafter in network1.values():
        grafter.close()
    # The same kind of file really runs code when loaded unsafely, so the check below means something.
    probe = tmp_path / "unsafe-load-probe"
    torch.save({"model": _MakesDirectoryWhenLoaded(probe)}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe.is_dir()

    nets = {shared: start(tmp_path, shared.name, flags_for(data, shared, num=2, i=2, epochs=2)) for shared in network1}
    for shared, net in nets.items():
        assert finish([net]) == [1], net.report()
        line = one_line(net.stderr)
        assert str(shared / "net1_epoch1.tensors") in line, line
        assert not (shared / "net2" / "last.pt").exists(), "nothing may be grafted from a bad file"
    assert "truncated or corrupt" in one_line(nets[truncated].stderr)
    assert "holds NaN or infinite values (conv1.weight)" in one_line(nets[nonfinite].stderr)
    assert "is a torch.save file" in one_line(nets[malicious].stderr)
    assert "has no metadata, so this project did not write it" in one_line(nets[bare].stderr)
    assert not marker.exists(), "the peer file was unpickled"


@pytest.mark.e2e
def test_a_corrupt_peer_file_deleted_as_advised_is_skipped_and_the_ring_goes_on(tmp_path: Path, data: Path) -> None:
    shared = tmp_path / "s"
    net1 = start(tmp_path, "net1", flags_for(data, shared, num=2, i=1, epochs=3))
    wait_until(lambda: (shared / "net1_epoch1.tensors").exists(), "network 1's epoch-1 file", [net1])
    spoiled = shared / "net1_epoch1.tensors"
    spoiled.write_bytes(spoiled.read_bytes()[: spoiled.stat().st_size // 2])
    net2 = start(tmp_path, "net2", flags_for(data, shared, num=2, i=2, epochs=3))
    assert finish([net2]) == [1], net2.report()
    line = one_line(net2.stderr)
    assert f"{spoiled} is truncated or corrupt" in line, line
    assert "nothing from it was used: delete it and restart this network with --resume" in line, line

    # The advice, literally. Network 1 grafted network 2's epoch 1 meanwhile and never writes epoch 1 again.
    spoiled.unlink()
    net2 = start(tmp_path, "net2-resumed", flags_for(data, shared, num=2, i=2, epochs=3, extra=("--resume",)))
    assert finish([net1, net2]) == [0, 0], net1.report() + net2.report()
    assert "epoch 1 is not grafted" in net2.log, net2.log
    assert [r["grafted"] for r in read_metrics(shared / "net2" / "metrics.jsonl")] == [False, True, False]
    assert last_state(shared, 2)["epoch"] == 3


# ----------------------------------------------------------------------------------------------
# One network's own checkpoint: settings, full disk, NaN, corruption


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    """A baseline run killed after it saved epoch 1 (so during epoch 2); returns its --s. Copy before use."""
    workdir = tmp_path_factory.mktemp("interrupted")
    shared = workdir / "s"
    net = start(workdir, "net1", flags_for(data, shared, num=1, i=1, epochs=3))
    wait_until(lambda: (shared / "net1" / "last.pt").exists(), "the epoch-1 checkpoint", [net])
    kill(net)
    assert last_state(shared, 1)["epoch"] == 1, net.report()
    return shared


def copy_run(interrupted_run: Path, tmp_path: Path) -> Path:
    """A private copy of the interrupted run's --s folder under ``tmp_path``."""
    shared = tmp_path / "s"
    shutil.copytree(interrupted_run, shared)
    return shared


def cifar_main() -> Callable[[list[str]], None]:
    """The CIFAR script's ``main``, to run in this process (see :func:`run_main_here`)."""
    from grafting_cifar.train import main

    return main


@pytest.mark.e2e
def test_resume_checks_the_saved_configuration(
    tmp_path: Path, data: Path, interrupted_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = {  # case: (flags, exit code, text of the error line)
        "lr": (("--resume", "--lr", "0.05"), 2, "--resume: --lr was 0.1 in {config} but is 0.05 now"),
        # The optimizer's saved state would silently override a new weight decay: refused instead.
        "wd": (
            ("--resume", "--wd", "0.001"),
            2,
            "--resume: --wd/--weight-decay was 0.0005 in {config} but is 0.001 now",
        ),
        "fresh": ((), 1, "{last} already exists; pass --resume"),
    }
    for case, (extra, expected_code, said) in cases.items():
        shared = copy_run(interrupted_run, tmp_path / case)
        files = NetworkFiles(shared, 1)
        before = digest(files.config), digest(files.last)
        code, stderr = run_main_here(cifar_main(), flags_for(data, shared, num=1, i=1, epochs=3, extra=extra), capsys)
        line = one_line(stderr)
        assert code == expected_code and said.format(config=files.config, last=files.last) in line, (case, line)
        assert (digest(files.config), digest(files.last)) == before, case


@pytest.mark.e2e
def test_a_folder_another_run_took_over_is_refused_and_the_advice_works(
    tmp_path: Path, data: Path, interrupted_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = copy_run(interrupted_run, tmp_path)
    saved = json.loads((shared / "ring.json").read_text())
    (shared / "ring.json").write_text(json.dumps({**saved, "ring": "0123456789ab"}) + "\n")  # another run's
    resume = flags_for(data, shared, num=1, i=1, epochs=3, extra=("--resume",))
    code, stderr = run_main_here(cifar_main(), resume, capsys)
    line = one_line(stderr)
    assert code == 1 and "names ring 0123456789ab: another run has used" in line, line
    # Followed literally: the network's net1 folder copied into a new --s, resumed there to the end.
    moved = tmp_path / "moved"
    shutil.copytree(shared / "net1", moved / "net1")
    run_main_to_the_end(cifar_main(), flags_for(data, moved, num=1, i=1, epochs=3, extra=("--resume",)))
    assert last_state(moved, 1)["epoch"] == 3
    assert json.loads((moved / "ring.json").read_text())["ring"] == saved["ring"]


def ring_stopped_one_epoch_apart(workdir: Path, data: Path) -> Path:
    """A ring of two stopped as a scheduler leaves one: network 2 was stopped after it published epoch 3 and
    before it saved it (last.pt of epoch 2), network 1 went on to grafting epoch 3 (last.pt of epoch 3) and
    was stopped while it waited for network 2's epoch 4. Returns its --s."""
    shared = workdir / "s"
    net1 = start(workdir, "net1", flags_for(data, shared, num=2, i=1))
    net2 = start(workdir, "net2", flags_for(data, shared, num=2, i=2))
    last1 = shared / "net1" / "last.pt"
    wait_until(lambda: last1.exists() and last_state(shared, 1)["epoch"] == 2, "network 1's epoch 2", [net1, net2])
    net1.process.send_signal(signal.SIGSTOP)  # held before it publishes epoch 3
    wait_until(lambda: (shared / "net2_epoch3.tensors").exists(), "network 2's epoch-3 file", [net1, net2])
    net2.process.send_signal(signal.SIGTERM)  # waiting for network 1's epoch 3: stops with epoch 2 saved
    assert finish([net2]) == [STOPPED_EXIT_CODE], net2.report()
    net1.process.send_signal(signal.SIGCONT)
    wait_until(lambda: (shared / "net1_epoch4.tensors").exists(), "network 1's epoch-4 file", [net1])
    net1.process.send_signal(signal.SIGTERM)
    assert finish([net1]) == [STOPPED_EXIT_CODE], net1.report()
    assert (last_state(shared, 1)["epoch"], last_state(shared, 2)["epoch"]) == (3, 2)
    return shared


@pytest.mark.e2e
@pytest.mark.slow
def test_a_ring_stopped_one_epoch_apart_moves_out_of_a_taken_folder_as_advised_and_loses_no_graft(
    tmp_path: Path, data: Path, reference_ring: Path
) -> None:
    shared = ring_stopped_one_epoch_apart(tmp_path, data)
    (shared / "ring.json").write_text(json.dumps({"format": RING_FORMAT, "ring": "0123456789ab"}))  # another run's
    refused = start(tmp_path, "net2-refused", flags_for(data, shared, num=2, i=2, extra=("--resume",)))
    assert finish([refused]) == [1], refused.report()
    line = one_line(refused.stderr)
    assert "another run has used" in line and "copy its networks' net<i> folders into a new --s" in line, line
    # Followed literally: the folders and the exchange files it names, in a new --s; each network resumed there.
    files = line.split("copy its exchange files ", 1)[1].split(" into the new folder too")[0].split()
    assert "net1_epoch3.tensors" in files, (
        "network 2 grafts network 1's epoch 3, which network 1 will not publish again"
    )
    moved = tmp_path / "moved"
    for folder in ("net1", "net2"):
        shutil.copytree(shared / folder, moved / folder)
    for name in files:
        shutil.copy2(shared / name, moved / name)
    resumed = [
        start(tmp_path, f"net{i}-moved", flags_for(data, moved, num=2, i=i, extra=("--resume",))) for i in (1, 2)
    ]
    assert finish(resumed) == [0, 0], "\n".join(net.report() for net in resumed)
    assert "is not grafted" not in resumed[1].log, resumed[1].log
    assert_same_weights(moved, reference_ring)
    # Network 2 published its epoch 3 again after network 1 had finished reading it: nothing is left behind.
    assert not list(moved.glob("net*_epoch*")), sorted(p.name for p in moved.glob("net*_epoch*"))


@pytest.mark.e2e
def test_write_error_while_saving_keeps_the_previous_checkpoint(
    tmp_path: Path, data: Path, interrupted_run: Path
) -> None:
    shared = copy_run(interrupted_run, tmp_path)
    last, best = shared / "net1" / "last.pt", shared / "net1" / "best.pt"
    last_before = digest(last)
    # Room for best.pt but not for last.pt, which also holds the optimizer's momentum.
    limit = (best.stat().st_size + last.stat().st_size) // 2
    net = start(
        tmp_path,
        "net1",
        flags_for(data, shared, num=1, i=1, epochs=3, extra=("--resume",)),
        # Files the child writes may not grow past the limit (EFBIG, like a full disk); SIGXFSZ ignored, so
        # that a write past it fails instead of killing the process.
        rlimits={"RLIMIT_FSIZE": (limit, limit)},
        ignore_signals=("SIGXFSZ",),
    )
    assert finish([net]) == [1], net.report()
    line = one_line(net.stderr)
    assert f"could not write {last}: File too large; the previous checkpoint is intact" in line, line
    assert digest(last) == last_before
    assert last_state(shared, 1)["epoch"] == 1
    assert temp_files(shared) == []


def test_nan_loss_in_the_first_epoch_stops_before_anything_is_shared(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = tmp_path / "s"
    # Network 1 of a ring of 2 diverges at once; a peer must never receive its broken weights.
    flags = flags_for(data, shared, num=2, i=1, extra=("--lr", "1e8", "--peer-timeout", "60"))
    code, stderr = run_main_here(cifar_main(), flags, capsys)
    line = one_line(stderr)
    assert code == 1 and "the loss became NaN or infinite in epoch 1, batch " in line, line
    assert "before any checkpoint was written" in line and "--lr" in line, line
    assert exchange_files(shared) == set()
    assert sorted(path.name for path in (shared / "net1").iterdir()) == ["config.json"]


@pytest.mark.e2e
def test_nan_loss_later_keeps_the_last_good_checkpoint(
    tmp_path: Path, data: Path, interrupted_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = copy_run(interrupted_run, tmp_path)
    last, best = shared / "net1" / "last.pt", shared / "net1" / "best.pt"
    # A stand-in for a run that diverges: finite weights, but momentum so large that the first step of
    # epoch 2 overflows. The loss of batch 1 is computed before that step, so batch 2 is the first bad one.
    state = torch.load(last, weights_only=True)
    for buffers in state["optimizer"]["state"].values():
        buffers["momentum_buffer"].fill_(3e38)
    torch.save(state, last)
    before = digest(last), digest(best)
    code, stderr = run_main_here(
        cifar_main(), flags_for(data, shared, num=1, i=1, epochs=3, extra=("--resume",)), capsys
    )
    line = one_line(stderr)
    assert code == 1 and "the loss became NaN or infinite in epoch 2, batch 2" in line, line
    assert "the checkpoint of epoch 1 is intact" in line.lower(), line
    assert (digest(last), digest(best)) == before
    assert last_state(shared, 1)["epoch"] == 1


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
@pytest.mark.e2e
def test_corrupt_own_checkpoint_is_named_on_resume_and_the_advice_works(
    tmp_path: Path, data: Path, interrupted_run: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = copy_run(interrupted_run, tmp_path)
    last = shared / "net1" / "last.pt"
    content = last.read_bytes()
    last.write_bytes(content[: len(content) // 3] if damage == "truncated" else os.urandom(len(content)))
    damaged = digest(last)
    flags = flags_for(data, shared, num=1, i=1, epochs=3)
    code, stderr = run_main_here(cifar_main(), [*flags, "--resume"], capsys)
    line = one_line(stderr)
    assert code == 1 and f"--resume: network 1 has no usable checkpoint ({last} is truncated or corrupt" in line, line
    assert line.endswith(f"to train it again from epoch 1, move {shared / 'net1'} away and start without --resume")
    assert digest(last) == damaged, "the damaged file must be left for the user to inspect"
    if damage == "garbage":  # the advice, literally (once is enough)
        os.replace(shared / "net1", shared / "net1.damaged")
        run_main_to_the_end(cifar_main(), flags)
        assert last_state(shared, 1)["epoch"] == 3


@pytest.mark.e2e
def test_a_ring_extended_with_more_epochs_grafts_on(tmp_path: Path, data: Path, reference_ring: Path) -> None:
    """Every network resumed with a larger --epochs publishes and grafts the epoch that used to be final, and
    a network resumed before its peer says what the peer must do."""
    shared = tmp_path / "s"
    shutil.copytree(reference_ring, shared)
    more = RING_EPOCHS + 1
    net1 = start(tmp_path, "net1", flags_for(data, shared, num=2, i=1, epochs=more, extra=("--resume",)))
    said = f"network 2 is not running (no heartbeat file {shared / 'net2.alive'}; it finished or stopped)"
    wait_until(lambda: said in net1.log, "network 1's note that network 2 must be extended too", [net1])
    net2 = start(tmp_path, "net2", flags_for(data, shared, num=2, i=2, epochs=more, extra=("--resume",)))
    assert finish([net1, net2]) == [0, 0], net1.report() + net2.report()
    for net, peer in ((net1, 2), (net2, 1)):
        assert f"epoch {RING_EPOCHS} was the last of the run before --epochs grew: grafting it now" in net.log
        assert f"epoch {RING_EPOCHS}: grafted network {peer} (" in net.log, net.log
        assert f"epoch {more}/{more} |" in net.log and f"epoch {RING_EPOCHS}/{more} |" not in net.log, net.log
    for i in (1, 2):
        assert last_state(shared, i)["epoch"] == more
        assert last_state(shared, i)["graft_step_done"] is False  # the new final epoch, ready for another extension
    assert exchange_files(shared) == set()


@pytest.mark.e2e
def test_the_lock_dies_with_the_process_when_dataloader_workers_outlive_it(
    tmp_path: Path, data: Path, image_folder: Path
) -> None:
    """An automated restart (a requeue, a supervisor) right after kill -9 must find the lock free, although
    the DataLoader workers of the killed process live on for a few seconds."""
    cifar, imagenet = tmp_path / "cifar", tmp_path / "imagenet"
    runs = {
        cifar: (
            CIFAR_SCRIPT,
            flags_for(data, cifar, num=1, i=1, epochs=3, extra=("--pipeline", "torchvision", "--workers", "2")),
        ),
        imagenet: (
            IMAGENET_SCRIPT,
            imagenet_command(image_folder, tmp_path, ["--s", str(imagenet), "-j", "2", "--epochs", "2", "-p", "1"]),
        ),
    }
    for shared, (script, flags) in runs.items():
        net = start_script(script, flags, tmp_path, f"{shared.name}-first")
        wait_until(lambda net=net: "epoch 1 [" in net.log, "a progress line: the workers run", [net])
        kill(net)
        with Exchange(shared, 1, 1):  # at once: the lock died with its process
            pass
    resumed = [
        start_script(script, [*flags, "--resume"], tmp_path, f"{shared.name}-resumed")
        for shared, (script, flags) in runs.items()
    ]
    assert finish(resumed) == [0, 0], "\n".join(net.report() for net in resumed)


def _bad_labels(tmp_path: Path, data: Path) -> list[str]:
    copy = tmp_path / "data"
    shutil.copytree(data / "cifar-10-batches-py", copy / "cifar-10-batches-py")
    set_cifar_label(copy / "cifar-10-batches-py" / "data_batch_3", 0, 12)
    return ["--data", str(copy)]


def _old_ring_files(tmp_path: Path, data: Path) -> list[str]:
    """A finished run's folder copied, its net1/, net2/ and tb/ deleted: ring.json and exchange files remain."""
    with Exchange(tmp_path / "s", 2, 2) as old:
        for epoch in (1, 2, 3):
            old.publish(
                epoch, models.create("resnet20", num_classes=10).state_dict(), {"model": "resnet20", "num_classes": 10}
            )
    return ["--num", "2", "--peer-timeout", "30"]


def _damaged(name: str, make: Callable[[Path], None]) -> Callable[[Path, Path], list[str]]:
    """Damage ``<s>/net1/<name>`` of a copy of the interrupted run, then --resume it."""

    def prepare(tmp_path: Path, interrupted: Path) -> list[str]:
        path = copy_run(interrupted, tmp_path) / "net1" / name
        path.unlink()
        make(path)
        return ["--resume", "--peer-timeout", "30"]

    return prepare


def _tb_is_a_file(tmp_path: Path, data: Path) -> list[str]:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "tb").write_text("")
    return []


def _lock_is_a_directory(tmp_path: Path, data: Path) -> list[str]:
    (tmp_path / "s" / "net1.lock").mkdir(parents=True)
    return []


def _read_only_folder(tmp_path: Path, data: Path) -> list[str]:
    """An existing folder this process cannot write into (root writes anywhere but into /sys)."""
    if os.geteuid() == 0:
        return ["--s", "/sys"]
    (tmp_path / "s").mkdir()
    (tmp_path / "s").chmod(0o555)
    return []


BAD_ENVIRONMENTS = {
    # case: (prepare(tmp_path, data or the interrupted run) -> extra flags, exit code, text of the one line)
    "tb-a-file": (
        _tb_is_a_file,
        1,
        "tb is a file, not a folder; the run writes TensorBoard events there: move it away",
    ),
    "lock-a-directory": (_lock_is_a_directory, 1, "net1.lock as network 1's lock file: is a directory; move it away"),
    "s-read-only": (_read_only_folder, 1, "Permission denied; choose a writable --s"),
    "labels-out-of-range": (_bad_labels, 2, "hold label 12, outside 0..9"),
    "old-ring-files": (
        _old_ring_files,
        1,
        "holds exchange files this ring cannot have written: net2_epoch1.tensors, "
        "net2_epoch2.tensors, net2_epoch3.tensors (network 2 has no config.json)",
    ),
    "config-missing": (
        _damaged("config.json", lambda path: None),
        2,
        "config.json is missing, so the settings this run must keep cannot be checked",
    ),
    "config-a-list": (
        _damaged("config.json", lambda path: path.write_text("[]")),
        2,
        "holds a JSON list, not the settings object",
    ),
    "config-garbled": (_damaged("config.json", lambda path: path.write_text('{"lr": 0.1,')), 2, "is not valid JSON"),
    "last-a-fifo": (_damaged("last.pt", os.mkfifo), 1, "last.pt is not a regular file"),
}


@pytest.mark.parametrize("case", list(BAD_ENVIRONMENTS))
@pytest.mark.e2e
def test_bad_files_and_folders_are_one_line_errors(
    case: str, tmp_path: Path, data: Path, interrupted_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prepare, expected_code, said = BAD_ENVIRONMENTS[case]
    extra = prepare(tmp_path, interrupted_run if case.startswith(("config", "last")) else data)
    code, stderr = run_main_here(
        cifar_main(), flags_for(data, tmp_path / "s", num=1, i=1, epochs=3, extra=tuple(extra)), capsys
    )
    line = one_line(stderr)
    assert code == expected_code and said in line, line
    assert "Traceback" not in stderr


# ----------------------------------------------------------------------------------------------
# Impossible flags: one line on stderr, exit code 2, nothing written (not even the --s folder)


MISSING = "<missing folder>"  # replaced by a path that does not exist
CUDA_CASES = {"cuda-absent"}  # only impossible where there is no GPU
MPS_CASES = {"device-mps"}  # only impossible where there is no Apple GPU

CIFAR_BAD_FLAGS = {
    # case: (flags, text the error line must contain)
    "num-0": (["--num", "0"], "--num"),
    "num-not-a-number": (["--num", "two"], "--num"),
    "i-0": (["--i", "0"], "--i"),
    "i-above-num": (["--num", "2", "--i", "3"], "--i"),
    "lr-negative": (["--lr", "-0.1"], "--lr"),
    "lr-nan": (["--lr", "nan"], "--lr"),
    "epochs-negative": (["--epochs", "-1"], "--epochs"),
    "epochs-0": (["--epochs", "0"], "--epochs"),
    "a-above-1": (["--a", "1.5"], "--a"),
    "a-negative": (["--a", "-0.1"], "--a"),
    "c-negative": (["--c", "-1"], "--c"),
    "c-nan": (["--c", "nan"], "--c"),
    "unknown-model": (["--model", "resnet7"], "--model"),
    "cifar-7": (["--cifar", "7"], "--cifar"),
    "missing-data": (["--data", MISSING], "--data"),
    "cuda-absent": (["--device", "cuda"], "--device"),
    "not-a-device": (["--device", "tpu"], "--device"),
    "batch-size-0": (["--batch-size", "0"], "--batch-size"),
    "test-batch-size-0": (["--test-batch-size", "0"], "--test-batch-size"),
    "step-epochs-0": (["--step-epochs", "0"], "--step-epochs"),
    "momentum-negative": (["--momentum", "-0.9"], "--momentum"),
    "weight-decay-negative": (["--wd", "-1"], "--weight-decay"),
    "peer-timeout-0": (["--peer-timeout", "0"], "--peer-timeout"),
    "peer-timeout-nan": (["--peer-timeout", "nan"], "--peer-timeout"),
    "threads-0": (["--threads", "0"], "--threads"),
    "workers-negative": (["--workers", "-1"], "--workers"),
    "print-freq-negative": (["--print-freq", "-1"], "--print_frequence"),
    "unknown-level": (["--level", "channel"], "--level"),
    "device-mps": (["--device", "mps"], "--device mps"),
    "device-meta": (["--device", "meta"], "--device meta"),
    "seed-huge": (["--seed", "99999999999999999999999"], "--seed"),
    "s-empty": (["--s", ""], "--s"),
    "kd-weight-nan": (["--kd-weight", "nan"], "--kd-weight"),
    "kd-temperature-inf": (["--kd-temperature", "inf"], "--kd-temperature"),
    "invalid-threshold-nan": (["--invalid-threshold", "nan"], "--invalid-threshold"),
}

IMAGENET_BAD_FLAGS = {
    "num-0": (["--num", "0"], "--num"),
    "i-above-num": (["--num", "2", "--i", "3"], "--i"),
    "lr-negative": (["--lr", "-0.1"], "--learning-rate"),
    "epochs-0": (["--epochs", "0"], "--epochs"),
    "a-above-1": (["--a", "1.5"], "--a"),
    "unknown-arch": (["-a", "resnet7"], "--arch"),
    "missing-data": (["--data", MISSING], "--data"),
    "cuda-absent": (["--device", "cuda"], "--device"),
    "batch-size-0": (["-b", "0"], "--batch-size"),
    "workers-negative": (["-j", "-1"], "--workers"),
    "momentum-negative": (["--momentum", "-0.9"], "--momentum"),
    "weight-decay-nan": (["--wd", "nan"], "--weight-decay"),
    "image-size-8": (["--image-size", "8"], "--image-size"),
    "start-epoch-beyond-epochs": (["--epochs", "2", "--start-epoch", "5"], "--start-epoch"),
}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny generated ImageFolder dataset (train/ and val/)."""
    return write_fake_imagefolder(
        tmp_path_factory.mktemp("imagefolder"), num_classes=3, train_per_class=4, val_per_class=2, image_size=32
    )


def cifar_command(data: Path, workdir: Path, flags: list[str]) -> list[str]:
    """A fast, otherwise valid CIFAR command line followed by ``flags`` (argparse: the last value wins)."""
    flags = [str(workdir / "no-data") if flag == MISSING else flag for flag in flags]
    return [
        "--data",
        str(data),
        "--s",
        str(workdir / "s"),
        "--epochs",
        "1",
        "--model",
        "resnet20",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--batch-size",
        str(BATCH),
        *flags,
    ]


def imagenet_command(data: Path, workdir: Path, flags: list[str]) -> list[str]:
    """A fast, otherwise valid ImageNet command line followed by ``flags``."""
    flags = [str(workdir / "no-data") if flag == MISSING else flag for flag in flags]
    return [
        "--data",
        str(data),
        "--s",
        str(workdir / "s"),
        "--epochs",
        "1",
        "-a",
        "resnet18",
        "--device",
        "cpu",
        "--threads",
        "1",
        "-b",
        "4",
        "-j",
        "0",
        "--image-size",
        "32",
        *flags,
    ]


def skip_if_cuda_case(case: str) -> None:
    """Skip a case that is only impossible on a machine without CUDA (or MPS)."""
    if case in CUDA_CASES and torch.cuda.is_available():
        pytest.skip("--device cuda is valid on this machine")
    if case in MPS_CASES and torch.backends.mps.is_available():
        pytest.skip("--device mps is valid on this machine")


def run_main_here(
    main: Callable[[list[str]], None], argv: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[object, str]:
    """Call a script's ``main`` in this process and expect it to exit; return its exit code and stderr (the
    logging and thread count it set up are put back: :func:`helpers.script_state`)."""
    with script_state(), pytest.raises(SystemExit) as stopped:
        main(argv)
    return stopped.value.code, capsys.readouterr().err


def run_main_to_the_end(main: Callable[[list[str]], None], argv: list[str]) -> None:
    """Call a script's ``main`` in this process and expect it to finish (see :func:`run_main_here`)."""
    with script_state():
        main(argv)


@pytest.mark.parametrize("case", sorted(CIFAR_BAD_FLAGS))
def test_cifar_bad_flag_is_one_line_exit_2_and_writes_nothing(
    case: str, tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from grafting_cifar.train import main

    skip_if_cuda_case(case)
    flags, named = CIFAR_BAD_FLAGS[case]
    code, stderr = run_main_here(main, cifar_command(data, tmp_path, flags), capsys)
    line = one_line(stderr)
    assert code == 2, stderr
    assert named in line and "error" in line, line
    assert list(tmp_path.iterdir()) == [], "a rejected command must write nothing"


@pytest.mark.parametrize("case", sorted(IMAGENET_BAD_FLAGS))
def test_imagenet_bad_flag_is_one_line_exit_2_and_writes_nothing(
    case: str, tmp_path: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from grafting_imagenet.train import main

    skip_if_cuda_case(case)
    flags, named = IMAGENET_BAD_FLAGS[case]
    code, stderr = run_main_here(main, imagenet_command(image_folder, tmp_path, flags), capsys)
    line = one_line(stderr)
    assert code == 2, stderr
    assert named in line and "error" in line, line
    assert list(tmp_path.iterdir()) == [], "a rejected command must write nothing"


@pytest.mark.e2e
def test_bad_flags_in_processes(tmp_path: Path, data: Path, image_folder: Path) -> None:
    """A few of the cases above as processes (all at once): the exit code and stderr a shell sees."""
    scripts = {
        "cifar": (CIFAR_SCRIPT, CIFAR_BAD_FLAGS, cifar_command, data),
        "imagenet": (REPO / "grafting_imagenet" / "train.py", IMAGENET_BAD_FLAGS, imagenet_command, image_folder),
    }
    chosen = [("cifar", "lr-nan"), ("cifar", "cuda-absent"), ("imagenet", "missing-data")]
    if torch.cuda.is_available():
        chosen = [(script, case) for script, case in chosen if case not in CUDA_CASES]
    started = []
    for script, case in chosen:
        path, table, command, dataset = scripts[script]
        workdir = tmp_path / f"{script}-{case}"
        workdir.mkdir()
        flags, named = table[case]
        process = popen_forked(
            [sys.executable, str(path), *command(dataset, workdir, flags)],
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        started.append((f"{script} {case}", workdir, named, process))
    for name, workdir, named, process in started:
        _, stderr = process.communicate(timeout=300)
        line = one_line(stderr)
        assert process.returncode == 2, f"{name}: {stderr}"
        assert named in line and "Traceback" not in stderr, f"{name}: {line}"
        assert list(workdir.iterdir()) == [], f"{name}: a rejected command must write nothing"
