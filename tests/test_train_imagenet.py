"""End-to-end tests of the ImageNet script (grafting_imagenet/train.py) on a generated ImageFolder tree.

Training runs are processes (one per network, forked from the tests' warm fork server, or a real torchrun
of two gloo ranks on the CPU); evaluation, flag checks and model construction run in this process. Images
are small (32 px crops of ~40 px JPEG files, 3 classes) so that ResNet-18 and MobileNetV2 train in seconds.

Catching the grafted weights of epoch 1 needs no race with the writer: network 2 is given one
epoch more than network 1. Network 1's last epoch (2) publishes nothing, so network 2, after
grafting epoch 1 and saving ``last.pt``, publishes epoch 2 and then waits for a file that never
comes. Its ``last.pt`` is then exactly the grafted state of epoch 1, next to both networks'
pre-graft exchange files of epoch 1, and the test kills it there, as a crash would.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import IMAGENET_SCRIPT, Proc, finish, kill, start_process, wait_until

from grafting.checkpoint import load_file
from grafting.data.fake import stand_in_description, write_fake_imagefolder
from grafting.distributed import Processes, per_process
from grafting.errors import UsageError
from grafting.method.graft import graft_layers
from grafting.ring.exchange_file import read as read_exchange_file
from grafting.train.imagenet_models import create_model
from grafting.train.report import read_metrics
from grafting_imagenet import train as imagenet_train

SCRIPT = IMAGENET_SCRIPT
FAST = ["--device", "cpu", "--threads", "1", "-j", "0", "-b", "16", "--image-size", "32", "-p", "0"]
TIMEOUT_S = 240.0


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes, 16 training and 8 validation JPEG files per class, about 40 px."""
    return write_fake_imagefolder(
        tmp_path_factory.mktemp("imagefolder"), num_classes=3, train_per_class=16, val_per_class=8, image_size=40
    )


def start(log: Path, *args: str, torchrun: int = 0) -> Proc:
    """Start the script with its output in ``log``: forked from the warm fork server, or under a real
    ``torchrun --nproc_per_node N`` when ``torchrun``."""
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun), "--"]
        if torchrun
        else [sys.executable]
    )
    return start_process([*launcher, str(SCRIPT), *args], log.parent, log.stem, output=log, fork=not torchrun)


def succeeded(proc: Proc) -> str:
    """Wait for ``proc``; assert it succeeded; return its output."""
    [code] = finish([proc], TIMEOUT_S)
    assert code == 0, proc.log
    return proc.log


def epoch_results(shared: Path, net: int) -> dict[int, tuple[float, float, float | None]]:
    """Epoch -> (test loss, top-1, top-5) from network ``net``'s metrics.jsonl (top-5 None: 3 classes)."""
    records = read_metrics(shared / f"net{net}" / "metrics.jsonl")
    assert len({r["epoch"] for r in records}) == len(records), records
    return {r["epoch"]: (r["test_loss"], r["test_acc"], r["test_acc5"]) for r in records}


def ring_until_graft(workdir: Path, data: Path, arch: str, *extra: str) -> Path:
    """Networks 1 and 2 (2 epochs) side by side; network 2 is killed in epoch 2, as soon as its last.pt of
    epoch 1 exists, and network 1 finishes (its last epoch needs no peer).

    Returns the shared folder: ``net2/last.pt`` then holds network 2's grafted weights of epoch 1.
    """
    shared = workdir / "ring"
    common = [
        *FAST,
        "--data",
        str(data),
        "--s",
        str(shared),
        "--num",
        "2",
        "-a",
        arch,
        "--keep-all",
        "--epochs",
        "2",
        *extra,
    ]
    net1 = start(workdir / "net1.log", *common, "--i", "1")
    net2 = start(workdir / "net2.log", *common, "--i", "2")
    wait_until(lambda: (shared / "net2" / "last.pt").exists(), "network 2's last.pt of epoch 1", [net2], TIMEOUT_S)
    kill(net2)
    text1 = succeeded(net1)
    assert sorted(epoch_results(shared, 1)) == [1, 2], text1
    return shared


def assert_last_is_graft_of_epoch1(shared: Path, arch: str, rule: str) -> None:
    """net2/last.pt == net2's epoch-1 file grafted with net1's, recomputed here."""
    saved = load_file(shared / "net2" / "last.pt")
    assert saved["epoch"] == 1
    own = read_exchange_file(shared / "net2_epoch1.tensors")[0]
    peer = read_exchange_file(shared / "net1_epoch1.tensors")[0]
    model = create_model(arch, 3)
    model.load_state_dict(own)
    records = graft_layers(model, peer, a=0.4, c=500.0, rule=rule, criterion="entropy")
    assert len({r.alpha for r in records}) > 1, "every layer got the same coefficient: nothing to tell apart"
    expected = model.state_dict()
    assert list(saved["model"]) == list(expected)
    changed = 0
    for key, tensor in expected.items():
        assert saved["model"][key].dtype == tensor.dtype, key
        torch.testing.assert_close(saved["model"][key], tensor, rtol=0, atol=1e-6, msg=key)
        changed += not torch.equal(own[key], tensor)
    assert changed > len(expected) // 2, f"grafting changed only {changed} of {len(expected)} tensors"
    assert json.loads((shared / "net2" / "config.json").read_text())["graft_rule"] == rule


def run_main(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Call the script's main in this process; return (exit code, stdout, stderr)."""
    code = 0
    try:
        imagenet_train.main(argv)
    except SystemExit as stop:
        code = int(stop.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def evaluated(out: str) -> tuple[float, float | None, float]:
    """(top-1, top-5 or None, loss) from the line -e prints (top-5 only for more than 5 classes)."""
    match = re.search(r"evaluate .*: top-1 ([\d.]+)(?: top-5 ([\d.]+))? loss ([\d.]+)", out)
    assert match, out
    return float(match.group(1)), float(match.group(2)) if match.group(2) else None, float(match.group(3))


def folder_state(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


# ----------------------------------------------------------------------------------------------
# Two ResNet-18 networks (name rule), resume, evaluation


@pytest.fixture(scope="module")
def resnet_ring(tmp_path_factory: pytest.TempPathFactory, image_folder: Path) -> Path:
    """A ResNet-18 ring stopped with network 2's grafted epoch 1 in last.pt (see the module docstring)."""
    workdir = tmp_path_factory.mktemp("resnet_ring")
    shared = ring_until_graft(workdir, image_folder, "resnet18")
    os.link(shared / "net2" / "last.pt", workdir / "net2_last_epoch1.pt")  # the resume test replaces last.pt
    return shared


@pytest.mark.e2e
def test_resnet18_networks_graft_each_other_with_the_name_rule(resnet_ring: Path) -> None:
    assert_last_is_graft_of_epoch1(resnet_ring, "resnet18", "name")
    epochs = epoch_results(resnet_ring, 1)
    # Three classes: top-5 is always 100 %, so it is neither logged nor recorded.
    assert all(0.0 <= top1 <= 100.0 and top5 is None for _, top1, top5 in epochs.values())
    assert "top5" not in (resnet_ring.parent / "net1.log").read_text()
    assert {p.name for p in resnet_ring.glob("*.tensors")} == {"net1_epoch1.tensors", "net2_epoch1.tensors"}


@pytest.mark.e2e
def test_killed_network_resumes_from_its_last_checkpoint(resnet_ring: Path, image_folder: Path) -> None:
    log = resnet_ring.parent / "net2_resume.log"
    # Epoch 2 is the last: network 2 finishes it without a peer.
    args = [
        *FAST,
        "--data",
        str(image_folder),
        "--s",
        str(resnet_ring),
        "--num",
        "2",
        "--i",
        "2",
        "--epochs",
        "2",
        "--keep-all",
        "--resume",
    ]
    text = succeeded(start(log, *args))
    assert "resumed from" in text and "epoch 1 done" in text, text
    assert "epoch 1/2 |" not in text and "epoch 2/2 |" in text, text
    assert sorted(epoch_results(resnet_ring, 2)) == [1, 2]
    resumed = load_file(resnet_ring / "net2" / "last.pt")
    before = load_file(resnet_ring.parent / "net2_last_epoch1.pt")
    assert resumed["epoch"] == 2
    # Epoch 2 continued the saved schedule and momentum rather than starting afresh.
    assert resumed["scheduler"]["last_epoch"] == 2 * before["scheduler"]["last_epoch"]
    assert not torch.equal(resumed["model"]["conv1.weight"], before["model"]["conv1.weight"])


@pytest.mark.e2e
def test_evaluate_reports_the_best_checkpoint_and_writes_nothing(
    resnet_ring: Path, image_folder: Path, capsys: pytest.CaptureFixture, in_process_logs: None
) -> None:
    before = folder_state(resnet_ring)
    code, out, err = run_main(
        [*FAST, "--data", str(image_folder), "--s", str(resnet_ring), "--num", "2", "--i", "1", "-e"], capsys
    )
    assert code == 0, err
    top1, top5, _ = evaluated(out)
    best = load_file(resnet_ring / "net1" / "best.pt")
    assert top1 == pytest.approx(best["acc"], abs=0.005)
    assert top5 is None  # three classes
    assert "(GENERATED stand-in data)" in out
    assert folder_state(resnet_ring) == before


@pytest.mark.e2e
def test_evaluate_a_checkpoint_file_in_another_layout(
    resnet_ring: Path, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture, in_process_logs: None
) -> None:
    last = load_file(resnet_ring / "net1" / "last.pt")
    wrapped = tmp_path / "ddp_style.pth"  # what a DDP training script of another project saves
    torch.save({"state_dict": {f"module.{k}": v for k, v in last["model"].items()}, "epoch": 2}, wrapped)
    code, out, err = run_main([*FAST, "--data", str(image_folder), "-e", "--checkpoint", str(wrapped)], capsys)
    assert code == 0, err
    top1, top5, loss = evaluated(out)
    final_loss, final_top1, final_top5 = epoch_results(resnet_ring, 1)[2]
    # The final epoch's tested weights are last.pt's: the same numbers as the training run's own test.
    assert top1 == pytest.approx(final_top1, abs=0.005) and top5 is final_top5 is None
    assert loss == pytest.approx(final_loss, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize(
    "case, expected_code, message",
    [
        ("missing", 2, "no checkpoint at"),
        ("other_arch", 1, "does not fit -a resnet18"),
    ],
)
def test_evaluate_rejects_missing_or_unfitting_checkpoints(
    case: str,
    expected_code: int,
    message: str,
    image_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    in_process_logs: None,
) -> None:
    path = tmp_path / "model.pth"
    if case == "other_arch":
        torch.save(create_model("mobilenet_v2", 3).state_dict(), path)
    code, out, err = run_main([*FAST, "--data", str(image_folder), "-e", "--checkpoint", str(path)], capsys)
    assert code == expected_code
    assert message in err and str(path) in err
    assert len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------------------------
# A non-ResNet architecture: the module rule


@pytest.mark.e2e
def test_mobilenet_v2_networks_graft_with_the_module_rule(tmp_path: Path, image_folder: Path) -> None:
    shared = ring_until_graft(tmp_path, image_folder, "mobilenet_v2", "--steplr")
    assert_last_is_graft_of_epoch1(shared, "mobilenet_v2", "module")


# ----------------------------------------------------------------------------------------------
# Several processes for one network: torchrun with gloo on the CPU


@pytest.mark.e2e
@pytest.mark.slow
def test_torchrun_network_grafts_and_resumes_next_to_a_single_process_peer(
    tmp_path: Path, image_folder: Path, capsys: pytest.CaptureFixture, in_process_logs: None
) -> None:
    shared = tmp_path / "ring"
    common = [*FAST, "--data", str(image_folder), "--s", str(shared), "--num", "2", "--steplr", "--keep-all"]
    ddp = start(tmp_path / "net1.log", *common, "--i", "1", "--epochs", "2", torchrun=2)
    single = start(tmp_path / "net2.log", *common, "--i", "2", "--epochs", "2")
    text = succeeded(ddp)
    succeeded(single)

    # Rank 0 alone logs the epoch lines and owns the shared folder.
    assert "[net 1/2 rank 0]" in text and "[net 1/2 rank 1]" not in text, text
    assert sorted(epoch_results(shared, 1)) == [1, 2]
    names = {p.name for p in shared.iterdir()}  # a finished ring removes its locks and heartbeats
    assert names == {"net1", "net2", "tb", "ring.json", "net1_epoch1.tensors", "net2_epoch1.tensors"}, names
    config = json.loads((shared / "net1" / "config.json").read_text())
    assert (config["world_size"], config["batch_size"]) == (2, 16)

    def check_final_epoch_matches_last_pt(epoch: int) -> None:
        # The ranks each test half of the validation set with their own copy of the weights; the summed
        # result equals one process testing last.pt only if every rank held rank 0's weights (grafted
        # or resumed) and BatchNorm statistics.
        code, out, err = run_main(
            [*FAST, "--data", str(image_folder), "-e", "--checkpoint", str(shared / "net1" / "last.pt")], capsys
        )
        assert code == 0, err
        top1, top5, loss = evaluated(out)
        logged_loss, logged_top1, _ = epoch_results(shared, 1)[epoch]
        assert top1 == pytest.approx(logged_top1, abs=0.005)
        assert loss == pytest.approx(logged_loss, rel=1e-4, abs=1e-4)

    check_final_epoch_matches_last_pt(2)

    # Resume under torchrun: rank 0 reads last.pt and hands weights, optimizer and schedule to rank 1. Both
    # networks go on to epoch 3, grafting epoch 2 first (the final epoch of the first run grafted nothing).
    resumed = start(tmp_path / "net1_resume.log", *common, "--i", "1", "--epochs", "3", "--resume", torchrun=2)
    peer = start(tmp_path / "net2_resume.log", *common, "--i", "2", "--epochs", "3", "--resume")
    text = succeeded(resumed)
    succeeded(peer)
    assert "epoch 2: grafted network 2 (" in text, text
    assert "resumed from" in text and "epoch 3/3 |" in text and "epoch 2/3 |" not in text, text
    assert sorted(epoch_results(shared, 1)) == [1, 2, 3]
    check_final_epoch_matches_last_pt(3)


# ----------------------------------------------------------------------------------------------
# Flags, models, --pretrained and --start-epoch (in this process)


def test_flags_follow_the_original_names() -> None:
    args = imagenet_train.parse_args(
        ["-a", "mobilenet_v2", "--a", "0.3", "-p", "5", "--wd", "5e-5", "-j", "2", "-b", "64", "--steplr", "--gpu", "1"]
    )
    assert (args.model, args.a, args.print_freq, args.weight_decay, args.workers, args.batch_size) == (
        "mobilenet_v2",
        0.3,
        5,
        5e-5,
        2,
        64,
    )
    assert args.cos is False and args.gpu == 1
    defaults = imagenet_train.parse_args([])
    assert (
        defaults.model,
        defaults.epochs,
        defaults.batch_size,
        defaults.lr,
        defaults.weight_decay,
        defaults.print_freq,
        defaults.workers,
        defaults.cos,
        defaults.difflr,
    ) == ("resnet18", 90, 256, 0.1, 1e-4, 10, None, True, False)  # -j: see the next test


@pytest.mark.parametrize("cores, workers", [(2, 2), (4, 4), (64, 4)])
def test_default_workers_are_capped_by_the_cores(cores: int, workers: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(imagenet_train, "available_cores", lambda: cores)
    assert imagenet_train.default_workers() == workers


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-a", "resnet81"], "did you mean resnet18"),
        (["--gpu", "0", "--device", "cpu"], "--gpu N is short for --device cuda:N"),
        (["--checkpoint", "x.pt"], "--checkpoint only applies with -e/--evaluate"),
        (["--start-epoch", "5", "--epochs", "4"], "--start-epoch must lie in 1..--epochs"),
    ],
)
def test_bad_flags_are_one_line_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        imagenet_train.parse_args(argv)


def test_batch_size_must_split_over_the_processes() -> None:
    procs = Processes(rank=0, local_rank=0, world_size=3)
    assert per_process(12, procs, "-b") == 4
    with pytest.raises(UsageError, match="divisible by the 3 processes"):
        per_process(16, procs, "-b")


def test_pretrained_without_cached_weights_names_the_file_and_downloads_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(UsageError, match=re.escape(str(expected))):
        create_model("resnet18", 3, pretrained=True)
    assert not expected.exists()


@pytest.mark.parametrize("arch, classifier", [("resnet18", "fc"), ("squeezenet1_1", "classifier.1")])
def test_pretrained_weights_load_from_the_cache_and_the_classifier_is_resized(
    arch: str, classifier: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = create_model(arch, 1000)  # stands in for the published file
    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    path = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    path.parent.mkdir(parents=True)
    torch.save(cached.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="grafting"):
        model = create_model(arch, 3, pretrained=True)
    state, reference = model.state_dict(), cached.state_dict()
    layer = model.get_submodule(classifier)
    assert (layer.out_features if isinstance(layer, torch.nn.Linear) else layer.out_channels) == 3
    kept = [k for k in reference if not k.startswith(classifier + ".")]
    assert kept and all(torch.equal(state[k], reference[k]) for k in kept)
    assert f"'{classifier}'" in caplog.text and "1000-class" in caplog.text


def test_start_epoch_without_resume_moves_the_schedule_on(
    tmp_path: Path, image_folder: Path, capsys: pytest.CaptureFixture, in_process_logs: None
) -> None:
    shared = tmp_path / "run"
    code, out, err = run_main(
        [
            *FAST,
            "--data",
            str(image_folder),
            "--s",
            str(shared),
            "--epochs",
            "3",
            "--start-epoch",
            "3",
            "--steplr",
            "--step-epochs",
            "1",
            "-a",
            "squeezenet1_1",
        ],
        capsys,
    )
    assert code == 0, err
    assert "--start-epoch 3 without --resume" in out
    [record] = read_metrics(shared / "net1" / "metrics.jsonl")
    assert record["epoch"] == 3 and record["lr"] == pytest.approx(0.001)  # 0.1 * 0.1 ** 2
    assert re.search(r"epoch 3/3 .*\| lr 0\.00100 \(epoch start\) \|", out), out
    config = json.loads((shared / "net1" / "config.json").read_text())
    assert config["workers"] == 0 and config["generated_data"] is True
    assert config["stand_in"] == stand_in_description(image_folder) and "3 classes" in config["stand_in"]
    assert load_file(shared / "net1" / "last.pt")["epoch"] == 3


def test_evaluate_pretrained_weights_from_the_cache(
    image_folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    in_process_logs: None,
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.get_model_weights("squeezenet1_1").DEFAULT.url
    path = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    path.parent.mkdir(parents=True)
    torch.save(create_model("squeezenet1_1", 1000).state_dict(), path)
    before = folder_state(tmp_path)
    code, out, err = run_main(
        [
            *FAST,
            "--data",
            str(image_folder),
            "--s",
            str(tmp_path / "unused"),
            "-a",
            "squeezenet1_1",
            "--pretrained",
            "-e",
        ],
        capsys,
    )
    assert code == 0, err
    assert "evaluate torchvision's pretrained squeezenet1_1" in out and "replaced" in out
    top1, top5, _ = evaluated(out)
    assert 0.0 <= top1 <= 100.0 and top5 is None  # three classes: no top-5
    assert folder_state(tmp_path) == before


def test_evaluate_takes_the_recipe_from_the_run_and_reads_only_val(
    image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture, in_process_logs: None
) -> None:
    # A run of network 2 of some ring, trained with a non-default architecture and image size.
    net2 = tmp_path / "run" / "net2"
    net2.mkdir(parents=True)
    (net2 / "config.json").write_text(json.dumps({"model": "squeezenet1_1", "image_size": 40, "num": 3, "i": 2}))
    torch.manual_seed(0)
    torch.save({"model": create_model("squeezenet1_1", 3).state_dict(), "acc": 40.0}, net2 / "best.pt")
    only_val = tmp_path / "only-val"  # no train/: evaluating must not need it
    only_val.mkdir()
    (only_val / "val").symlink_to(image_folder / "val")
    common = ["--device", "cpu", "--threads", "1", "-j", "0", "-b", "8", "--data", str(only_val)]

    code, out, err = run_main([*common, "--s", str(tmp_path / "run"), "--i", "2", "-e"], capsys)  # no -a, no --num
    assert code == 0, err
    assert f"evaluate: -a/--arch squeezenet1_1, --image-size 40 from {net2 / 'config.json'}" in out
    top1, top5, loss = evaluated(out)
    assert top5 is None  # three classes

    code, out, err = run_main(
        [*common, "-a", "squeezenet1_1", "--image-size", "40", "-e", "--checkpoint", str(net2 / "best.pt")], capsys
    )
    assert code == 0, err
    assert evaluated(out) == (top1, None, loss)  # the same numbers as with the flags given by hand

    code, out, err = run_main([*common, "--s", str(tmp_path / "run"), "--i", "2", "-e", "-a", "resnet50"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "-a/--arch resnet50 but" in err and "squeezenet1_1" in err, err
