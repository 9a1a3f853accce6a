"""End-to-end runs of the CIFAR training script, one process per network.

Every network is its own ``grafting_cifar/train.py`` process (a fork of the tests' warm fork server, which
runs the command line as a new interpreter would) on the CPU with one thread, reading a generated CIFAR in
the real pickle format, exactly as a user's ring of ``nohup`` jobs would run.
The grafting of epoch 1 is checked against a recomputation from the files the processes left:
each network's pre-graft exchange file ``net<i>_epoch1.tensors`` and its post-graft ``last.pt`` of
epoch 1. ``last.pt`` is replaced by a rename after every epoch, so a watcher thread hard-links
each new version while the ring runs (see :class:`FileVersions`).
"""

from __future__ import annotations

import json
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
from helpers import CIFAR_SCRIPT, Proc, child_env, finish, start_script, train_ring

from grafting import graft_filters, graft_layers
from grafting.archs import cifar_models as models
from grafting.data.fake import stand_in_description, write_fake_cifar
from grafting.ring.exchange_file import read as read_exchange_file
from grafting.train.report import read_metrics

SCRIPT = CIFAR_SCRIPT
# Small batches keep an epoch of a few hundred images at a couple of seconds on one CPU thread.
FAST_FLAGS = ["--device", "cpu", "--threads", "1", "--batch-size", "32", "--test-batch-size", "64"]


# ----------------------------------------------------------------------------------------------
# Data


@pytest.fixture(scope="session")
def cifar10(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated CIFAR-10 (256 train / 64 test images) shared by the ResNet runs."""
    return write_fake_cifar(tmp_path_factory.mktemp("cifar10"), 10, train_size=256, test_size=64)


@pytest.fixture(scope="session")
def cifar10_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smaller generated CIFAR-10 for VGG-11, which costs about four times ResNet-20 per image."""
    return write_fake_cifar(tmp_path_factory.mktemp("cifar10_tiny"), 10, train_size=96, test_size=32, seed=1)


@pytest.fixture(scope="session")
def cifar100(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated CIFAR-100 (200 train / 100 test images)."""
    return write_fake_cifar(tmp_path_factory.mktemp("cifar100"), 100, train_size=200, test_size=100)


# ----------------------------------------------------------------------------------------------
# Launching networks


def launch(workdir: Path, net: int, flags: list[str], log_name: str | None = None) -> Proc:
    """Start ``train.py --i net`` with ``flags`` in ``workdir``; stdout and stderr go to files there."""
    return start_script(SCRIPT, ["--i", str(net), *flags], workdir, log_name or f"net{net}")


def logs(networks: list[Proc]) -> str:
    """Everything the networks printed, for failure messages."""
    return "\n".join(n.report() for n in networks)


def assert_all_succeeded(networks: list[Proc]) -> None:
    """Every network exited 0 and wrote nothing on stderr."""
    for network in networks:
        assert network.process.returncode == 0, logs(networks)
        assert network.stderr == "", logs(networks)


def epochs_done(shared: Path, net: int) -> list[int]:
    """The epochs in network ``net``'s metrics.jsonl, in order (each once, resumed runs included)."""
    return [record["epoch"] for record in read_metrics(shared / f"net{net}" / "metrics.jsonl")]


def predecessor(net: int, num: int) -> int:
    """The network whose weights network ``net`` grafts: the one before it, network ``num`` for network 1."""
    return num if net == 1 else net - 1


def ring_flags(data: Path, shared: Path, num: int, epochs: int, *extra: str) -> list[str]:
    """The command line every network of a ring shares (all but ``--i``); --keep-all because the tests read
    the exchange files, which a finished ring otherwise removes."""
    return [
        "--data",
        str(data),
        "--s",
        str(shared),
        "--num",
        str(num),
        "--epochs",
        str(epochs),
        *FAST_FLAGS,
        "--keep-all",
        *extra,
    ]


# ----------------------------------------------------------------------------------------------
# Catching the post-graft weights of epoch 1


class FileVersions:
    """Keeps every version of files that a run replaces by renaming new files over them.

    A watcher thread polls the files; whenever one has a new inode it hard-links that inode into
    ``keep``. A rename never changes a file that already has a name, so each link holds one complete
    version (no copy can catch a half-written file), and polling costs two system calls per file.
    A version lives for at least one epoch of training, hundreds of times the polling interval.
    """

    def __init__(self, files: list[Path], keep: Path, interval_s: float = 0.005) -> None:
        self.files = files
        self.keep = keep
        self.interval_s = interval_s
        self._kept: dict[Path, list[Path]] = {file: [] for file in files}
        self._seen: dict[Path, set[int]] = {file: set() for file in files}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        keep.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> FileVersions:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()  # the final versions

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._poll()

    def _poll(self) -> None:
        for index, file in enumerate(self.files):
            try:
                inode = os.stat(file).st_ino
            except FileNotFoundError:
                continue
            if inode in self._seen[file]:
                continue
            copy = self.keep / f"{index}-{len(self._kept[file])}{file.suffix}"
            try:
                os.link(file, copy)
            except FileNotFoundError:
                continue
            # The name may have moved on between stat and link: record the version actually kept.
            self._seen[file].add(os.stat(copy).st_ino)
            self._kept[file].append(copy)

    def versions(self, file: Path) -> list[Path]:
        """The kept versions of ``file``, oldest first."""
        return list(self._kept[file])


def last_checkpoint_of_epoch(versions: FileVersions, last: Path, epoch: int) -> dict:
    """The version of a network's ``last.pt`` written after ``epoch``."""
    kept = [torch.load(path, weights_only=True) for path in versions.versions(last)]
    found = [state for state in kept if state["epoch"] == epoch]
    assert found, f"no version of {last} from epoch {epoch} was caught (saw epochs {[s['epoch'] for s in kept]})"
    return found[0]


def exchange_file(shared: Path, net: int, epoch: int) -> dict:
    """Network ``net``'s pre-graft exchange file of ``epoch``: ``{'model': state_dict, 'meta': {...}}``."""
    state, meta = read_exchange_file(shared / f"net{net}_epoch{epoch}.tensors")
    return {"model": state, "meta": meta}


def recomputed_graft(shared: Path, net: int, peer: int, epoch: int, *, level: str) -> dict[str, torch.Tensor]:
    """Network ``net``'s weights after grafting ``peer``'s file of ``epoch`` into its own, computed here."""
    config = json.loads((shared / f"net{net}" / "config.json").read_text())
    own, theirs = exchange_file(shared, net, epoch), exchange_file(shared, peer, epoch)
    model = models.create(config["model"], num_classes=config["num_classes"])
    model.load_state_dict(own["model"])
    if level == "layer":
        graft_layers(
            model,
            theirs["model"],
            a=config["a"],
            c=config["c"],
            rule=config["graft_rule"],
            criterion=config["criterion"],
        )
    else:
        graft_filters(model, theirs["model"])
    return model.state_dict()


def assert_states_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    """Same entries in the same order; floats within 1e-6, integers (batch counters) exactly."""
    assert list(actual) == list(expected), f"{what}: different entries"
    for key, tensor in expected.items():
        if torch.is_floating_point(tensor):
            torch.testing.assert_close(
                actual[key], tensor, rtol=0.0, atol=1e-6, msg=lambda m, key=key: f"{what}, {key}: {m}"
            )
        else:
            assert torch.equal(actual[key], tensor), f"{what}, {key}: {actual[key]} != {tensor}"


def check_ring_grafted_epoch1(shared: Path, num: int, versions: FileVersions, *, level: str = "layer") -> None:
    """Every network's post-graft weights of epoch 1 equal the grafting of the two pre-graft files."""
    for net in range(1, num + 1):
        peer = predecessor(net, num)
        after = last_checkpoint_of_epoch(versions, shared / f"net{net}" / "last.pt", 1)["model"]
        expected = recomputed_graft(shared, net, peer, 1, level=level)
        assert_states_equal(after, expected, f"net {net} after grafting net {peer}'s epoch 1")
        own = exchange_file(shared, net, 1)["model"]
        changed = [k for k, v in own.items() if torch.is_floating_point(v) and not torch.equal(v, after[k])]
        assert len(changed) > len(own) // 2, f"net {net}: grafting left most entries untouched"


def watched_last_files(shared: Path, num: int) -> list[Path]:
    """Every network's resumable checkpoint ``<s>/net<i>/last.pt``."""
    return [shared / f"net{net}" / "last.pt" for net in range(1, num + 1)]


def run_ring(workdir: Path, data: Path, num: int, epochs: int, *extra: str) -> tuple[Path, list[Proc], FileVersions]:
    """Start ``num`` networks side by side, watch their ``last.pt`` and wait for all of them."""
    shared = workdir / "ring"
    versions = FileVersions(watched_last_files(shared, num), workdir / "kept")
    with versions:
        flags = [["--i", str(net), *ring_flags(data, shared, num, epochs, *extra)] for net in range(1, num + 1)]
        networks = train_ring(SCRIPT, flags, workdir)
    assert_all_succeeded(networks)
    return shared, networks, versions


def assert_tensorboard_run(folder: Path) -> None:
    """The event file holds the per-epoch histograms and pictures, the peer's entropies and the settings."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    [events] = folder.glob("events.out.tfevents.*")
    tags = {value.tag for event in EventFileLoader(str(events)).Load() for value in event.summary.value}
    expected = {
        "alpha/all_layers",
        "filters/l1_norm",
        "filters/l1_norm_distribution",
        "entropy_peer/conv1.weight",
        "settings/text_summary",
        "_hparams_/session_start_info",
        "test/acc",
        "graft/coefficient_mean",
    }
    assert expected <= tags, expected - tags


def assert_exchange_files(shared: Path, expected: set[str]) -> None:
    """Exactly these exchange files (and no half-written ones) are left in the shared folder."""
    assert {p.name for p in shared.glob("net*_epoch*.tensors*")} == expected


# ----------------------------------------------------------------------------------------------
# Rings


@pytest.fixture(scope="module")
def resnet20_ring(tmp_path_factory: pytest.TempPathFactory, cifar10: Path) -> tuple[Path, list[Proc], FileVersions]:
    """Three ResNet-20 networks trained side by side for 2 epochs: the ring the next tests read."""
    return run_ring(tmp_path_factory.mktemp("resnet20_ring"), cifar10, 3, 2, "--model", "resnet20")


@pytest.mark.e2e
def test_networks_graft_their_predecessors_and_record_it(
    resnet20_ring: tuple[Path, list[Proc], FileVersions], cifar10: Path
) -> None:
    shared, networks, versions = resnet20_ring
    for network in networks:
        first, final = read_metrics(shared / network.name / "metrics.jsonl")
        assert (first["epoch"], final["epoch"]) == (1, 2)
        assert first["grafted"] and first["graft_ms"] > 0, "epoch 1 should report the time spent grafting"
        assert first["peer"] == predecessor(int(network.name[3:]), 3) and first["waited_s"] >= 0
        assert len(first["alphas"]) == 19 and first["alphas"].keys() == first["entropies"].keys()  # resnet20's convs
        assert all(0.3 <= alpha <= 0.7 for alpha in first["alphas"].values())
        alphas = list(first["alphas"].values())
        assert (first["alpha_mean"], first["alpha_min"], first["alpha_max"]) == (
            pytest.approx(sum(alphas) / len(alphas)),
            min(alphas),
            max(alphas),
        )
        assert first["entropies"].keys() == first["peer_entropies"].keys()
        assert first["total_filters"] == 688 and set(first["invalid_filters"]) == {"0.1", "0.01"}  # resnet20
        assert first["lr"] == 0.1 and 0 < first["epoch_s"] <= first["elapsed_s"] < final["elapsed_s"]
        assert first["eta_s"] > 0 and final["eta_s"] == 0
        assert not final["grafted"] and final["graft_ms"] is None, "the final epoch neither waits nor grafts"
        assert final["alpha_mean"] is None and final["invalid_filters"]
        # The epoch lines print what metrics.jsonl holds.
        assert (
            f"epoch 1/2 | train loss {first['train_loss']:.4f} acc {first['train_acc']:.2f} | test loss "
            f"{first['test_loss']:.4f} acc {first['test_acc']:.2f} top5 {first['test_acc5']:.2f} "
            f"| best {first['best_acc']:.2f} | lr 0.10000 (epoch start) | wait"
        ) in network.log
        assert (
            f"| alpha mean {first['alpha_mean']:.3f} min {first['alpha_min']:.3f} max {first['alpha_max']:.3f} "
            f"| invalid {first['invalid_filters']['0.1']}/688 (l1 < 0.1) |"
        ) in network.log
        assert re.search(r"epoch 1/2 .* \| elapsed \d+s \| ETA \d+s\n", network.log), network.log
        assert re.search(r"epoch 2/2 .*\| no graft \(last epoch\) \|.* \| elapsed \d+s\n", network.log), network.log
        assert "layer grafting, name rule" in network.log
        # The data is a generated stand-in, and every record of the run says so.
        assert "data: GENERATED stand-in in" in network.log and "(GENERATED stand-in data)" in network.log
        config = json.loads((shared / network.name / "config.json").read_text())
        assert config["generated_data"] is True
        assert (
            config["stand_in"]
            == stand_in_description(cifar10)
            == "CIFAR-10 layout, 256 train and 64 test images, seed 0"
        )
        last = torch.load(shared / network.name / "last.pt", weights_only=True)
        assert last["epoch"] == 2
        assert (shared / network.name / "best.pt").is_file()
        assert_tensorboard_run(shared / "tb" / network.name)
    # The final epoch publishes nothing: its tested weights are final.
    assert_exchange_files(shared, {"net1_epoch1.tensors", "net2_epoch1.tensors", "net3_epoch1.tensors"})
    meta = exchange_file(shared, 2, 1)["meta"]
    assert (meta["net"], meta["num"], meta["epoch"], meta["model"], meta["num_classes"]) == (2, 3, 1, "resnet20", 10)
    # The networks start from different seeds, so grafting really mixes different networks.
    one, two = exchange_file(shared, 1, 1)["model"], exchange_file(shared, 2, 1)["model"]
    assert not torch.equal(one["conv1.weight"], two["conv1.weight"])


@pytest.mark.e2e
def test_every_network_holds_the_graft_of_its_predecessors_file(
    resnet20_ring: tuple[Path, list[Proc], FileVersions],
) -> None:
    shared, networks, versions = resnet20_ring
    for network in networks:
        assert epochs_done(shared, int(network.name[3:])) == [1, 2], network.log
    check_ring_grafted_epoch1(shared, 3, versions)  # network 1 grafts network 3: the ring closes


@pytest.mark.e2e
def test_baseline_exchanges_nothing(tmp_path: Path, cifar10: Path) -> None:
    # The original torchvision pipeline, without workers, so both data paths run end to end.
    shared, networks, _ = run_ring(
        tmp_path, cifar10, 1, 2, "--model", "resnet20", "--pipeline", "torchvision", "--workers", "0"
    )

    log = networks[0].log
    assert "no grafting (baseline)" in log
    assert "data pipeline: torchvision" in log
    assert epochs_done(shared, 1) == [1, 2], log
    assert [r["grafted"] for r in read_metrics(shared / "net1" / "metrics.jsonl")] == [False, False]
    assert_exchange_files(shared, set())
    assert torch.load(shared / "net1" / "last.pt", weights_only=True)["epoch"] == 2


@pytest.mark.e2e
def test_cifar100_ring(tmp_path: Path, cifar100: Path) -> None:
    shared, networks, versions = run_ring(tmp_path, cifar100, 2, 2, "--model", "resnet20", "--cifar", "100")

    for network in networks:
        assert "CIFAR-100: 200 training and 100 test images" in network.log
        assert epochs_done(shared, int(network.name[3:])) == [1, 2], network.log
    state = exchange_file(shared, 1, 1)
    assert state["meta"]["num_classes"] == 100
    assert state["model"]["linear.weight"].shape[0] == 100
    check_ring_grafted_epoch1(shared, 2, versions)


@pytest.mark.e2e
def test_filter_level_grafting_with_vgg(tmp_path: Path, cifar10_tiny: Path) -> None:
    shared, networks, versions = run_ring(tmp_path, cifar10_tiny, 2, 2, "--model", "vgg11", "--level", "filter")

    for network in networks:
        assert "filter grafting" in network.log
        assert epochs_done(shared, int(network.name[3:])) == [1, 2], network.log
        first = read_metrics(shared / network.name / "metrics.jsonl")[0]
        assert first["filter_weights"] and not first["alphas"] and "| filter w mean " in network.log
    check_ring_grafted_epoch1(shared, 2, versions, level="filter")


# ----------------------------------------------------------------------------------------------
# Resuming


@pytest.mark.e2e
def test_resumed_network_rejoins_the_ring(tmp_path: Path, cifar10: Path) -> None:
    shared = tmp_path / "ring"
    flags = ring_flags(cifar10, shared, 2, 3, "--model", "resnet20")
    networks = [launch(tmp_path, net, flags) for net in (1, 2)]
    last = shared / "net2" / "last.pt"
    deadline = time.monotonic() + 300
    # Network 2 crashes as soon as its first epoch is saved (SIGKILL: no clean-up runs).
    while not last.exists() and networks[1].process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    networks[1].process.send_signal(signal.SIGKILL)
    networks[1].process.wait()
    assert last.exists(), logs(networks)
    stopped_after = torch.load(last, weights_only=True)["epoch"]
    assert stopped_after < 3, "network 2 finished before it could be stopped"

    # Network 1 waits for network 2 (its predecessor) and goes on once the restarted network catches up.
    restarted = launch(tmp_path, 2, [*flags, "--resume"], log_name="net2-resumed")
    finish([networks[0], restarted])
    assert_all_succeeded([networks[0], restarted])

    resumed_log = restarted.log
    assert f"resumed from {last}: epoch {stopped_after} done" in resumed_log
    assert f"epoch {stopped_after}/3 |" not in resumed_log and "epoch 3/3 |" in resumed_log, resumed_log
    for net in (1, 2):  # every epoch once, the resumed ones included; the run's time goes on across the restart
        assert epochs_done(shared, net) == [1, 2, 3]
    elapsed = [record["elapsed_s"] for record in read_metrics(shared / "net2" / "metrics.jsonl")]
    assert elapsed == sorted(elapsed), elapsed
    for net in (1, 2):
        assert torch.load(shared / f"net{net}" / "last.pt", weights_only=True)["epoch"] == 3


# ----------------------------------------------------------------------------------------------
# Bad flags


BAD_FLAGS = {
    "i-zero": (["--num", "2", "--i", "0"], "--i"),
    "i-beyond-num": (["--num", "2", "--i", "3"], "--i"),
    "unknown-model": (["--model", "resnet7"], "--model"),
    "cifar-7": (["--cifar", "7"], "--cifar"),
    "missing-data": (["--data", "no-such-folder"], "--data"),
}


@pytest.fixture(scope="module")
def bad_flag_runs(tmp_path_factory: pytest.TempPathFactory, cifar10: Path) -> dict[str, tuple[Path, Proc]]:
    """Every bad command line, run at once, each in its own empty folder (the logs go elsewhere)."""
    logs = tmp_path_factory.mktemp("bad-flag-logs")
    started = {}
    for case, (flags, _) in BAD_FLAGS.items():
        workdir = tmp_path_factory.mktemp(case)
        data = [] if "--data" in flags else ["--data", str(cifar10)]
        command = ["--s", "shared", *data, "--device", "cpu", "--threads", "1", *flags]
        started[case] = (workdir, start_script(SCRIPT, command, workdir, case, logs=logs))
    finish([proc for _, proc in started.values()], timeout=120)
    return started


@pytest.mark.e2e
@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags_give_one_line_and_exit_2(case: str, bad_flag_runs: dict[str, tuple[Path, Proc]]) -> None:
    workdir, proc = bad_flag_runs[case]
    flag = BAD_FLAGS[case][1]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    assert flag in lines[0], lines[0]
    assert proc.returncode == 2, proc.stderr
    assert list(workdir.iterdir()) == [], "a rejected command line must write nothing (no --s folder)"


# ----------------------------------------------------------------------------------------------
# The console entry point


@pytest.mark.e2e
def test_graft_cifar_console_script_runs_this_checkout(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "graft-cifar"
    assert script.is_file(), f"{script} is missing: run `source scripts/env.sh` (it pip-installs this checkout)"
    env = {k: v for k, v in child_env().items() if k != "PYTHONPATH"}  # only the installation may resolve it

    usage = subprocess.run([str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert usage.returncode == 0, usage.stderr
    assert usage.stdout.startswith("usage: graft-cifar"), usage.stdout
    assert "--resume" in usage.stdout and "--keep-all" in usage.stdout

    bad = subprocess.run(
        [str(script), "--num", "2", "--i", "3", "--s", "shared"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert list(tmp_path.iterdir()) == []

    code = "import grafting_cifar.train as t, sys; print(t.__file__, 'torchvision' in sys.modules)"
    where = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert where.returncode == 0, where.stderr
    path, imports_torchvision = where.stdout.split()
    assert Path(path).resolve() == SCRIPT.resolve(), "the installed graft-cifar runs another checkout"
    assert imports_torchvision == "False", "the CIFAR script's start imports torchvision, which it does not need"
