"""The published recipes the project reproduces exactly, each compared with the published loop or
recipe written out in ``tests/published_code.py``, by ``torch.equal`` on whole state_dicts or schedules:

- filter-level grafting with ``bn_blend="repeated-whole"``: the published VGG ``BN()`` loop;
- ``scripts/imagenet.sh``: the baselines' step schedule and the grafting rings' cosine, per iteration, as
  the published ImageNet scripts set them; one network on one process trains like the published
  single-GPU loop (BatchNorm over the whole batch); SyncBatchNorm when a network has several GPUs;
- ``scripts/cifar_cultivation.sh``'s ``authors`` variant: the published distillation script;
- ``graft-filters --checkpoint published``: the checkpoints the published invalid-filter table counted,
  counted as the published comparison script did;
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import DEVICES, differing_entries, plan_script
from helpers.published_code import (
    BN_PARTS,
    published_distillation_epoch,
    published_imagenet_baseline_lr,
    published_imagenet_grafting_lr,
    published_invalid_filters,
    published_vgg_filter_graft,
)
from torch import nn

from grafting.archs import cifar_models as models
from grafting.distributed import Processes, sync_batchnorm
from grafting.errors import UsageError
from grafting.launch.plan import Plan
from grafting.method.distill import make_distiller
from grafting.method.graft import graft_filters
from grafting.ring.grafter import Grafter
from grafting.tools import filters as filters_tool
from grafting.tools.published import method_label
from grafting.train.imagenet_models import create_model
from grafting.train.loop import cross_entropy, train_one_epoch
from grafting.train.schedule import make_optimizer
from grafting_cifar.train import parse_args as parse_cifar_args
from grafting_imagenet.train import parse_args as parse_imagenet_args

# --- VGG filter-level grafting: the published BatchNorm loop ------------------------------------------------


def _vgg16_pair() -> tuple[nn.Module, nn.Module]:
    """Two CIFAR VGG-16s from different seeds, their BatchNorms given random scales, shifts and statistics
    (private copies: a test may graft them)."""
    return copy.deepcopy(_vgg16_pair_once())


@functools.cache
def _vgg16_pair_once() -> tuple[nn.Module, nn.Module]:
    pair = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = models.create("vgg16", num_classes=10)
        generator = torch.Generator().manual_seed(seed + 10)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    n = module.num_features
                    module.weight.copy_(torch.rand(n, generator=generator) * 2 - 1)
                    module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                    module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                    module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
        pair.append(model)
    return pair[0], pair[1]


@pytest.mark.parametrize("device", DEVICES)
def test_repeated_whole_bn_blend_is_the_published_vgg_loop_bit_for_bit(device: str) -> None:
    own, peer = (model.to(device) for model in _vgg16_pair())
    expected = copy.deepcopy(own)
    published_vgg_filter_graft(expected, peer)
    graft_filters(own, peer.state_dict(), bn_blend="repeated-whole")
    assert differing_entries(own.state_dict(), expected.state_dict()) == []


def test_repeated_whole_bn_blend_leaves_each_network_its_peers_batchnorm() -> None:
    """What the published loop amounts to (docs/METHOD.md §10.2): every BatchNorm entry ends as
    ``peer + (own - peer) * prod_j w_j``, i.e. the peer's within float32 rounding; the per-channel blend
    keeps a mixture. The convs are blended per channel either way, identically."""
    own, peer = _vgg16_pair()
    per_channel = copy.deepcopy(own)
    graft_filters(per_channel, peer.state_dict(), bn_blend="per-channel")
    graft_filters(own, peer.state_dict(), bn_blend="repeated-whole")
    theirs, repeated, blended = peer.state_dict(), own.state_dict(), per_channel.state_dict()
    bn_keys = [k for k in repeated if k.endswith(tuple(f".bn.{part}" for part in BN_PARTS))]
    assert bn_keys
    for key in bn_keys:
        assert torch.allclose(repeated[key], theirs[key], rtol=1e-6, atol=1e-7), key
        assert not torch.allclose(blended[key], theirs[key], rtol=1e-3), key
    assert (
        differing_entries(
            {k: v for k, v in repeated.items() if k not in bn_keys},
            {k: v for k, v in blended.items() if k not in bn_keys},
        )
        == []
    )


def test_unknown_bn_blend_is_a_usage_error() -> None:
    own, peer = _vgg16_pair()
    with pytest.raises(UsageError, match=r"unknown BatchNorm blend 'whole' \(bn_blend\)"):  # the library's words
        graft_filters(own, peer.state_dict(), bn_blend="whole")


def test_filter_bn_blend_flag() -> None:
    assert parse_cifar_args(["--level", "filter"]).filter_bn_blend == "per-channel"
    args = parse_cifar_args(["--level", "filter", "--filter-bn-blend", "repeated-whole", "--num", "2"])
    assert args.filter_bn_blend == "repeated-whole" and "filter_bn_blend" in args.peer_settings()
    with pytest.raises(UsageError, match="--filter-bn-blend repeated-whole only applies with --level filter"):
        parse_cifar_args(["--filter-bn-blend", "repeated-whole"])


def test_the_grafter_blends_batchnorms_as_configured(tmp_path) -> None:
    """Network 1 of a ring grafts network 2's published weights with the published loop."""
    own, peer = (models.vgg.CifarVGG([8, "M", 16, "M", 16, "M", 16, "M", 16, "M"]) for _ in range(2))
    for model, seed in ((own, 1), (peer, 2)):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.weight.copy_(torch.rand(module.num_features, generator=generator) * 2 - 1)
    expected = copy.deepcopy(own)
    published_vgg_filter_graft(expected, peer)
    settings = {"level": "filter", "bn_blend": "repeated-whole", "peer_timeout": 30}
    with Grafter(tmp_path, 2, 2, **settings) as second, Grafter(tmp_path, 1, 2, **settings) as first:
        second.publish(peer, 1)
        report = first.step(own, 1)
    assert report.grafted and report.peer == 2
    assert differing_entries(own.state_dict(), expected.state_dict()) == []


# --- ImageNet: the published schedules and the per-network layout -------------------------------------------


def _lr_per_iteration(config, iters_per_epoch: int) -> torch.Tensor:
    """The learning rate each iteration of the whole run trains with, by the project's optimizer and schedule."""
    optimizer, scheduler = make_optimizer(nn.Linear(1, 1), config, iters_per_epoch)
    lrs = []
    for _ in range(config.epochs * iters_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return torch.tensor(lrs, dtype=torch.float64)


def script_rows(script: str, tmp_path: Path, **settings: str) -> tuple[Plan, list[Any]]:
    """The launcher's plan of an experiment script and every network's parsed configuration, ring after ring
    (rings skipped for a missing teacher included)."""
    plan = plan_script(script, tmp_path, **settings)
    rows = [plan.trainer.parse(ring.network_args(net)) for ring in plan.rings for net in range(1, ring.num + 1)]
    return plan, rows


@pytest.mark.e2e  # bash prints scripts/imagenet.sh's rings
def test_imagenet_script_rows_follow_the_published_schedules(tmp_path) -> None:
    plan, rows = script_rows("imagenet.sh", tmp_path, GPUS="0,1", ARCHS="resnet18")
    assert {Path(args.s).name for args in rows} == {"resnet18_baseline", "resnet18_grafting"}
    assert plan.procs_per_net == 1, "one GPU per network, as published"
    iters = 7
    for args in rows:
        assert not args.sync_bn
        baseline = args.num == 1
        assert args.steplr == baseline and args.cos == (not baseline)
        epochs = range(args.epochs)
        if baseline:
            expected = [published_imagenet_baseline_lr(args.lr, e) for e in epochs for _ in range(iters)]
        else:
            expected = [
                published_imagenet_grafting_lr(args.lr, e, i, iters, args.epochs, steplr=False)
                for e in epochs
                for i in range(iters)
            ]
        assert torch.equal(_lr_per_iteration(args, iters), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.e2e  # bash prints scripts/imagenet.sh's rings
@pytest.mark.parametrize("sync", ["1", "0"])
def test_imagenet_networks_on_several_gpus_sync_their_batchnorms(tmp_path, sync: str) -> None:
    plan, rows = script_rows("imagenet.sh", tmp_path, GPUS="0,1,2,3", GPUS_PER_NET="2", ARCHS="resnet18", SYNC_BN=sync)
    assert len(rows) == 3
    assert plan.program()[-4:-1] == ["--nproc_per_node", "2", "--"]
    for args in rows:
        assert args.sync_bn == (sync == "1")


def test_one_process_per_network_trains_like_the_published_single_gpu_loop() -> None:
    """The baseline row's network, trained by the project's loop, optimizer and schedule in one process
    (BatchNorm over the whole batch), equals the published baseline.py loop on the same batches."""
    config = parse_imagenet_args(["--steplr", "--epochs", "90", "-b", "4"])
    torch.manual_seed(5)
    ours = create_model("resnet18", num_classes=10)
    theirs = copy.deepcopy(ours)
    generator = torch.Generator().manual_seed(6)
    batches = [
        (torch.randn(4, 3, 16, 16, generator=generator), torch.randint(0, 10, (4,), generator=generator))
        for _ in range(2)
    ]

    optimizer, scheduler = make_optimizer(ours, config, len(batches))
    train_one_epoch(ours, batches, optimizer, scheduler, epoch=1, print_freq=0)

    sgd = torch.optim.SGD(theirs.parameters(), config.lr, momentum=0.9, weight_decay=1e-4)
    theirs.train()
    for group in sgd.param_groups:
        group["lr"] = published_imagenet_baseline_lr(config.lr, 0)
    for images, target in batches:
        loss = nn.CrossEntropyLoss()(theirs(images), target)
        sgd.zero_grad()
        loss.backward()
        sgd.step()
    assert differing_entries(ours.state_dict(), theirs.state_dict()) == []


def test_sync_bn_converts_every_batchnorm_of_a_network_on_several_gpus() -> None:
    model = create_model("resnet18", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    several = Processes(rank=0, local_rank=0, world_size=2)
    synced = sync_batchnorm(model, several, torch.device("cuda"), enabled=True)
    assert not any(type(m) is nn.BatchNorm2d for m in synced.modules())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == 20
    assert differing_entries(synced.state_dict(), before) == [], "the checkpoints and the grafting see the same entries"
    # One process already holds the whole batch; without the flag each GPU normalises its own share.
    assert sync_batchnorm(model, Processes(), torch.device("cuda"), enabled=True) is model
    assert sync_batchnorm(model, several, torch.device("cuda"), enabled=False) is model


def test_sync_bn_on_cpu_processes_is_a_usage_error() -> None:
    several = Processes(rank=0, local_rank=0, world_size=2)
    with pytest.raises(UsageError, match="--sync-bn needs GPUs"):
        sync_batchnorm(nn.BatchNorm2d(3), several, torch.device("cpu"), enabled=True)
    assert parse_imagenet_args(["--sync-bn"]).sync_bn and not parse_imagenet_args([]).sync_bn


# --- cultivation: the authors' distillation variant ---------------------------------------------------------


@pytest.mark.e2e  # bash prints scripts/cifar_cultivation.sh's rings
def test_authors_cultivation_variant_trains_like_the_published_distillation_script(tmp_path) -> None:
    """The 'authors' row of scripts/cifar_cultivation.sh is one network, not grafted, distilling from one
    teacher checkpoint with the published loss, temperature and schedule: a few steps of it equal the
    published distillation loop on the same batches, whole state_dict."""
    teachers = tmp_path / "teachers"
    _, rows = script_rows(
        "cifar_cultivation.sh",
        tmp_path,
        GPUS="0",
        MODELS="resnet20",
        DATASETS="10",
        VARIANTS="authors",
        TEACHER_RUNS=str(teachers),
    )
    [config] = rows
    assert (config.num, config.distill, config.kd_temperature, config.kd_weight) == (1, "teacher", 2.0, 1.0)
    assert not config.kd_soften_teacher and not config.cos and not config.difflr
    assert (config.lr, config.step_epochs, config.epochs, config.weight_decay) == (0.1, 60, 200, 5e-4)
    assert config.teacher == [str(teachers / "resnet20_c10_baseline" / "net1" / "best.pt")]

    torch.manual_seed(7)
    teacher = models.create("resnet20", num_classes=10)
    Path(config.teacher[0]).parent.mkdir(parents=True)
    torch.save({"model": teacher.state_dict()}, config.teacher[0])
    torch.manual_seed(8)
    student = models.create("resnet20", num_classes=10)
    published = copy.deepcopy(student)
    generator = torch.Generator().manual_seed(9)
    batches = [
        (torch.randn(8, 3, 32, 32, generator=generator), torch.randint(0, 10, (8,), generator=generator))
        for _ in range(3)
    ]

    distiller = make_distiller(
        config.distill,
        student,
        teachers=config.teacher,
        teacher_model=config.model,
        num_classes=10,
        build_model=lambda name, classes: models.create(name, num_classes=classes),
        temperature=config.kd_temperature,
        weight=config.kd_weight,
        soften_teacher=config.kd_soften_teacher,
    )
    optimizer, scheduler = make_optimizer(student, config, len(batches))
    train_one_epoch(student, batches, optimizer, scheduler, epoch=1, criterion=distiller.criterion(cross_entropy))

    sgd = torch.optim.SGD(published.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    published_distillation_epoch(published, [teacher.eval()], batches, sgd, lr0=0.1, epoch=0)
    assert differing_entries(student.state_dict(), published.state_dict()) == []


# --- the invalid-filter table: what the authors counted -----------------------------------------------------


def _resnet32_state(seed: int, weak: int) -> dict[str, torch.Tensor]:
    """ResNet-32 weights with ``weak`` filters scaled to l1 norms between 0.001 and 0.2 (some invalid at 0.1,
    fewer at 0.01)."""
    torch.manual_seed(seed)
    state = models.create("resnet32").state_dict()
    keys = [k for k in state if "conv" in k]
    for n in range(weak):
        filt = state[keys[n % len(keys)]][n // len(keys)]
        filt.mul_((0.001 + 0.2 * n / weak) / float(filt.abs().sum()))
    return state


def _write_run(folder: Path, num: int, epochs: int, done: int, best: dict, last: dict) -> None:
    """A run folder as training leaves it: every network's config.json and metrics.jsonl (``done`` epochs),
    network 1's best.pt and last.pt."""
    for net in range(1, num + 1):
        (folder / f"net{net}").mkdir(parents=True)
        config = {"model": "resnet32", "dataset": "cifar10", "num": num, "i": net, "epochs": epochs}
        (folder / f"net{net}" / "config.json").write_text(json.dumps(config))
        lines = [json.dumps({"epoch": e, "epochs": epochs, "test_acc": 50.0 + e}) for e in range(1, done + 1)]
        (folder / f"net{net}" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    torch.save({"model": best, "epoch": 1, "acc": 51.0}, folder / "net1" / "best.pt")
    torch.save({"model": last, "epoch": done}, folder / "net1" / "last.pt")


def test_published_checkpoints_are_what_the_authors_counted(tmp_path, capsys) -> None:
    """``--checkpoint published``: the baseline's best.pt against the grafting run's network 1 of the final
    epoch (the published filter_comparison.sh: baseline best.t7 against ckpt1_199.t7), counted as the
    published filter_comparison.py counts; the default compares the two best.pt, as before."""
    states = {
        name: _resnet32_state(seed, weak)
        for name, seed, weak in [("bb", 1, 40), ("bl", 2, 30), ("gb", 3, 20), ("gl", 4, 10)]
    }
    _write_run(tmp_path / "base", 1, 3, 3, states["bb"], states["bl"])
    _write_run(tmp_path / "graft", 2, 3, 3, states["gb"], states["gl"])
    entries = [f"baseline={tmp_path / 'base'}", f"grafting={tmp_path / 'graft'}"]
    thresholds = [0.1, 0.01]

    published = filters_tool.count_filters(entries, thresholds, "published")
    assert [row.name for row in published] == ["baseline (net1/best.pt)", "grafting (net1/last.pt)"]
    for row, state in zip(published, (states["bb"], states["gl"])):
        assert row.counts == {t: published_invalid_filters(state, t) for t in thresholds}
    current = filters_tool.count_filters(entries, thresholds)
    for row, state in zip(current, (states["bb"], states["gb"])):
        assert row.counts == {t: published_invalid_filters(state, t) for t in thresholds}
    assert published[1].counts != current[1].counts

    filters_tool.main([*entries, "--checkpoint", "published", "--model", "resnet32"])
    out = capsys.readouterr().out
    assert f"| grafting (net1/last.pt) | {'/'.join(map(str, published_invalid_filters(states['gl'], 0.1)))} |" in out


def test_published_checkpoints_need_a_finished_grafting_run(tmp_path) -> None:
    state = _resnet32_state(1, 5)
    _write_run(tmp_path / "graft", 2, 3, 2, state, state)
    with pytest.raises(
        UsageError, match=r"this run is failed 2/3; let it finish, or count its latest weights with --checkpoint last"
    ):
        filters_tool.count_filters([str(tmp_path / "graft")], [0.1], "published")
    [row] = filters_tool.count_filters([str(tmp_path / "graft")], [0.1], "last")  # the advice, followed
    assert row.name.endswith("(net1/last.pt)")


def test_runs_with_the_published_bn_loop_have_their_own_label() -> None:
    assert method_label({"num": 2, "level": "filter"}) == "filter slr"
    assert (
        method_label({"num": 2, "level": "filter", "filter_bn_blend": "repeated-whole"}) == "filter slr repeated-whole"
    )
