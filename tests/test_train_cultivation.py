"""End-to-end runs of grafting_cifar/train.py with distillation and the ablation sources on generated
CIFAR data, one process per network. The scripts that run them (cifar_cultivation.sh, cifar_ablations.sh)
are planned in test_scripts.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import CIFAR_SCRIPT, Proc, finish, start_script, train_ring

from grafting.archs import cifar_models as models
from grafting.checkpoint import load_file
from grafting.data.fake import write_fake_cifar
from grafting.ring.exchange_file import read as read_exchange_file
from grafting.train.report import read_metrics

# Small and quick: resnet20, 256 training images, one thread per process; lr low enough for 2 epochs.
# --keep-all: the tests read the exchange files, which a finished ring otherwise removes.
COMMON = [
    "--model",
    "resnet20",
    "--epochs",
    "2",
    "--device",
    "cpu",
    "--threads",
    "1",
    "--batch-size",
    "64",
    "--lr",
    "0.02",
    "--print_frequence",
    "1000",
    "--keep-all",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cifar")
    write_fake_cifar(folder, train_size=256, test_size=100)
    return folder


def start(data: Path, shared: Path, num: int, i: int, *extra: str) -> Proc:
    flags = ["--data", str(data), "--s", str(shared), "--num", str(num), "--i", str(i), *COMMON, *extra]
    return start_script(CIFAR_SCRIPT, flags, shared.parent, f"{shared.name}-net{i}", merge_output=True)


def run_ring(data: Path, shared: Path, num: int, *extra: str) -> list[str]:
    """Start networks 1..num side by side, wait, and return their logs (each must exit 0)."""
    flags = [
        ["--data", str(data), "--s", str(shared), "--num", str(num), "--i", str(i), *COMMON, *extra]
        for i in range(1, num + 1)
    ]
    procs = train_ring(CIFAR_SCRIPT, flags, shared.parent / f"{shared.name}-logs", timeout=240)
    for proc in procs:
        assert proc.returncode == 0, proc.report()
    return [proc.log + proc.stderr for proc in procs]


def records(shared: Path, net: int) -> list[dict]:
    """Network ``net``'s metrics.jsonl: one record per epoch."""
    return read_metrics(shared / f"net{net}" / "metrics.jsonl")


def tensorboard_tags(folder: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.e2e
def test_two_networks_distil_from_their_peers(data: Path, tmp_path: Path) -> None:
    logs = run_ring(data, tmp_path, 2, "--distill", "peers")
    for net, log in zip((1, 2), logs):
        first, second = (r["loss_parts"] for r in records(tmp_path, net))
        # Epoch 1 has no teacher yet (the first exchange comes after it); epoch 2 learns from the peer.
        assert first["kd"] == 0.0 and first["ce"] > 0
        assert second["kd"] > 0 and second["ce"] > 0
        assert f"(ce {second['ce']:.4f} kd {second['kd']:.4f})" in log
        tags = tensorboard_tags(tmp_path / "tb" / f"net{net}")
        assert len(tags["train/ce"]) == 2 and tags["train/kd"][1] > 0
        for epoch in range(2):
            assert tags["train/loss"][epoch] == pytest.approx(
                tags["train/ce"][epoch] + tags["train/kd"][epoch], rel=1e-4
            )
        # The teacher of the last epoch is resumable: the predecessor's pre-graft weights of epoch 1.
        last = load_file(tmp_path / f"net{net}" / "last.pt")
        peer = read_exchange_file(tmp_path / f"net{2 if net == 1 else 1}_epoch1.tensors")[0]
        assert torch.equal(last["extra"]["distill_teacher"]["conv1.weight"], peer["conv1.weight"])
        config = json.loads((tmp_path / f"net{net}" / "config.json").read_text())
        assert (config["distill"], config["source"], config["criterion"]) == ("peers", "external", "entropy")


@pytest.mark.e2e
def test_one_network_distils_from_two_teachers_in_the_authors_form(data: Path, tmp_path: Path) -> None:
    teachers = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        path = tmp_path / f"teacher{seed}.pt"
        torch.save({"net": models.create("resnet20", num_classes=10).state_dict(), "acc": 50.0}, path)
        teachers += ["--teacher", str(path)]
    shared = tmp_path / "run"
    (log,) = run_ring(
        data, shared, 1, "--distill", "teacher", *teachers, "--kd-temperature", "2", "--no-kd-soften-teacher"
    )
    assert "distillation from 2 resnet20 teacher(s) (T 2, lambda 1, authors' form" in log
    parts = [r["loss_parts"] for r in records(shared, 1)]
    assert len(parts) == 2 and all(p["ce"] > 0 and p["kd"] > 0 for p in parts)
    tags = tensorboard_tags(shared / "tb" / "net1")
    assert len(tags["train/ce"]) == 2 and len(tags["train/kd"]) == 2


@pytest.mark.e2e
def test_a_teacher_that_does_not_fit_stops_before_training(data: Path, tmp_path: Path) -> None:
    path = tmp_path / "teacher.pt"
    torch.save(models.create("resnet20", num_classes=100).state_dict(), path)
    shared = tmp_path / "run"
    proc = start(data, shared, 1, 1, "--distill", "teacher", "--teacher", str(path))
    [code] = finish([proc], 120)
    out = proc.log
    assert code == 2, out
    assert f"error: --teacher {path} has 100 classes but this run trains 10" in out
    assert not (shared / "net1").exists()  # nothing of the run was written


@pytest.mark.parametrize("source", ["noise", "internal"])
@pytest.mark.e2e
def test_noise_and_internal_grafting_report_the_touched_filters(data: Path, tmp_path: Path, source: str) -> None:
    # A high threshold makes some of a fresh network's filters invalid, so the count is not trivially 0.
    (log,) = run_ring(data, tmp_path, 1, "--graft-source", source, "--invalid-threshold", "6")
    first, last = records(tmp_path, 1)
    touched = first["invalid_touched"]
    assert touched > 0 and f"| touched {touched} invalid" in log, log
    assert last["invalid_touched"] is None  # the last epoch's weights are final: nothing is grafted
    assert f"{source} grafting of invalid filters (l1 < 6)" in log
    assert tensorboard_tags(tmp_path / "tb" / "net1")["graft/invalid_touched"] == [touched]
    config = json.loads((tmp_path / "net1" / "config.json").read_text())
    assert (config["source"], config["criterion"], config["invalid_threshold"]) == (source, "entropy", 6.0)
    assert not list(tmp_path.glob("net1_epoch*.tensors"))


@pytest.mark.e2e
def test_two_networks_averaging(data: Path, tmp_path: Path) -> None:
    # A vanishing lr keeps epoch 2 from moving the conv weights, so the final weights show the average.
    logs = run_ring(data, tmp_path, 2, "--graft-source", "average", "--criterion", "l1", "--lr", "1e-9")
    assert all("plain averaging of 2 networks" in log for log in logs)
    published = [read_exchange_file(tmp_path / f"net{i}_epoch1.tensors")[0] for i in (1, 2)]
    final = [load_file(tmp_path / f"net{i}" / "last.pt")["model"] for i in (1, 2)]
    for key in ("conv1.weight", "layer2.0.conv1.weight", "linear.weight"):
        mean = (published[0][key] + published[1][key]) / 2
        assert not torch.allclose(published[0][key], mean, atol=1e-4)
        for state in final:
            torch.testing.assert_close(state[key], mean, atol=1e-6, rtol=0)
    configs = [json.loads((tmp_path / f"net{i}" / "config.json").read_text()) for i in (1, 2)]
    assert all((c["source"], c["criterion"]) == ("average", "l1") for c in configs)
