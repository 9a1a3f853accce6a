"""The comparison tools (grafting/tools/): invalid-filter tables, ensembles, run-folder summaries,
the data command, and the --help of every command.

Every input is generated here with an answer known by construction: checkpoints with chosen
filters zeroed, networks whose logits are a fixed table, run folders (config.json, metrics.jsonl,
heartbeat) written by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from grafting.archs import cifar_models as models
from grafting.data.fake import MARKER_NAME, write_fake_cifar
from grafting.errors import CheckpointError, UsageError
from grafting.method.filters import conv_filter_keys, count_invalid_filters
from grafting.tools import (
    data as data_tool,
)
from grafting.tools import (
    ensemble as ensemble_tool,
)
from grafting.tools import (
    filters as filters_tool,
)
from grafting.tools import (
    plot as plot_tool,
)
from grafting.tools import (
    published as published_tool,
)
from grafting.tools import (
    runs as runs_tool,
)
from grafting.tools import (
    summary as summary_tool,
)

# ----------------------------------------------------------------------------------------------
# Published numbers and method labels


def test_published_table_holds_every_row_of_method_section_8():
    cifar_rows = [k for k in published_tool.PUBLISHED if k[1].startswith("cifar")]
    # 4 models x 3 methods, 4 more network counts, the ensemble, 3 leaky x 2, VGG x 3, 5 c + 6 a values: x 2 datasets
    assert len(cifar_rows) == 2 * (12 + 4 + 1 + 6 + 3 + 11)
    assert len([k for k in published_tool.PUBLISHED if k[1] == "imagenet"]) == 6
    assert published_tool.PUBLISHED[("resnet110", "cifar100", "dlr")] == 75.27
    assert published_tool.PUBLISHED[("mobilenetv2", "cifar100", "dlr x6")] == 78.32
    assert published_tool.PUBLISHED_TOP5[("resnet50", "imagenet", "grafting")] == 93.34
    assert published_tool.PUBLISHED_INVALID[("mobilenetv2", "baseline", 0.01)] == (9834, 17088)


@pytest.mark.parametrize(
    "config, label",
    [
        ({"num": 1, "difflr": False, "cos": False}, "baseline"),
        ({"num": 1, "cos": True}, "baseline"),
        ({"num": 2, "difflr": False, "cos": False, "a": 0.4, "c": 500.0}, "slr"),
        ({"num": 2, "difflr": True, "cos": True}, "dlr"),
        ({"num": 3, "difflr": True, "cos": True}, "dlr x3"),
        ({"num": 2, "cos": True}, "cos"),
        ({"num": 2, "difflr": True, "cos": True, "level": "filter"}, "filter dlr"),
        ({"num": 2, "a": 0.4, "c": 1.0}, "slr a=0.4 c=1"),
        ({"num": 2, "a": 0.0, "c": 100.0, "difflr": True}, "dlr a=0 c=100"),
        ({"num": 2, "criterion": "l1"}, "slr l1"),
        ({"num": 1, "source": "noise"}, "noise slr"),
        ({"num": 2, "source": "average", "cos": True}, "average cos"),
        ({"num": 2, "difflr": True, "distill": "peers"}, "dlr +distill peers"),
        ({"num": 2, "distill": "none"}, "slr"),
        # The ImageNet script (it records steplr): its recipe is the paper's "grafting", cosine unless --steplr.
        ({"num": 2, "steplr": False, "cos": True}, "grafting"),
        ({"num": 2, "steplr": True, "cos": False}, "grafting steplr"),
        ({"num": 2, "steplr": False, "cos": True, "difflr": True}, "grafting dlr"),
        ({"num": 1, "steplr": False, "cos": True}, "baseline"),
    ],
)
def test_method_label(config, label):
    assert published_tool.method_label(config) == label


def test_published_accuracy_falls_back_to_grafting_where_the_paper_names_no_schedule():
    assert published_tool.published_accuracy("resnet32", "cifar10", "slr") == 93.33
    assert published_tool.published_accuracy("resnet32", "cifar10", "cos") is None  # the main table names its schedules
    assert published_tool.published_accuracy("resnet56_leaky", "cifar100", "dlr") == 73.14
    assert published_tool.published_accuracy("vgg16", "cifar10", "filter slr") == 94.26
    assert published_tool.published_accuracy("vgg16", "cifar10", "dlr") == 94.02
    assert published_tool.published_accuracy("mobilenetv2", "cifar10", "slr a=0.4 c=1") == 93.19
    assert published_tool.published_accuracy("mobilenetv2", "cifar100", "dlr a=1 c=100") == 72.27
    assert published_tool.published_accuracy("resnet34", "imagenet", "cos") == 74.58
    assert published_tool.published_accuracy("resnet34", "imagenet", "cos", top5=True) == 92.05
    assert published_tool.published_accuracy("resnet34", "imagenet", "grafting steplr") == 74.58
    assert published_tool.published_accuracy("resnet18", "imagenet", "grafting dlr", top5=True) == 90.01
    assert published_tool.published_accuracy("resnet20", "cifar10", "dlr") is None


# ----------------------------------------------------------------------------------------------
# Invalid filters


def _resnet32_with_zeroed_filters(zeroed: int, small: int) -> dict[str, torch.Tensor]:
    """ResNet-32 weights with ``zeroed`` filters at 0 and ``small`` more scaled to l1 norm 0.05."""
    torch.manual_seed(0)
    state = models.create("resnet32").state_dict()
    conv_keys = [k for k in state if "conv" in k and state[k].dim() == 4]
    picked = [(key, j) for key in conv_keys for j in range(2)][: zeroed + small]  # 2 filters per layer
    for n, (key, j) in enumerate(picked):
        filt = state[key][j]
        filt.mul_(0.0 if n < zeroed else 0.05 / float(filt.abs().sum()))
    return state


def _save(obj, path: Path) -> str:
    torch.save(obj, path)
    return str(path)


def test_count_filters_in_every_checkpoint_layout(tmp_path):
    state = _resnet32_with_zeroed_filters(zeroed=8, small=6)
    # Kaiming-initialised filters have l1 norms far above 0.1: only the chosen ones are invalid.
    layouts = {
        "bare": state,
        "t7": {"net": {f"module.{k}": v for k, v in state.items()}, "acc": 93.1, "epoch": 199},
        "model": {"model": state, "epoch": 3},
        "state_dict": {"state_dict": state},
    }
    paths = [f"{name}={_save(obj, tmp_path / f'{name}.pt')}" for name, obj in layouts.items()]
    rows = filters_tool.count_filters(paths, [0.1, 0.01])
    assert [row.name for row in rows] == list(layouts)
    for row in rows:
        assert row.counts == {0.1: (14, 1136), 0.01: (8, 1136)}


def test_paper_totals_come_out_of_the_tool(tmp_path):
    path = _save(models.create("mobilenetv2").state_dict(), tmp_path / "m.pt")
    [row] = filters_tool.count_filters([path], [1e-9])
    assert row.name == path
    assert row.counts[1e-9] == (0, 17088)


def test_filter_table_is_the_papers_layout():
    rows = [
        filters_tool.FilterRow("baseline", {0.1: (36, 1136), 0.01: (35, 1136)}),
        filters_tool.FilterRow("grafted", {0.1: (14, 1136), 0.01: (8, 1136)}),
    ]
    assert filters_tool.filter_table(rows, [0.1, 0.01], model="resnet32").splitlines() == [
        "| checkpoint | t = 0.1 | t = 0.01 |",
        "|---|---|---|",
        "| baseline | 36/1136 | 35/1136 |",
        "| grafted | 14/1136 | 8/1136 |",
        "| paper: resnet32 baseline | 36/1136 | 35/1136 |",
        "| paper: resnet32 grafting | 14/1136 | 8/1136 |",
    ]
    unreported = filters_tool.filter_table(rows, [0.1], model="resnet20")
    assert "paper:" not in unreported  # the paper counted ResNet-32 and MobileNetV2 only
    assert "it has no rows for resnet20" in unreported


def test_filters_cli_prints_the_table(tmp_path, capsys):
    path = _save({"net": _resnet32_with_zeroed_filters(zeroed=3, small=0)}, tmp_path / "ckpt.t7")
    filters_tool.main([f"mine={path}", "-t", "0.1,0.5"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| checkpoint | t = 0.1 | t = 0.5 |"
    assert out[2] == "| mine | 3/1136 | 3/1136 |"


def test_filters_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        filters_tool.main([str(tmp_path / "missing.pt")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.pt does not exist" in err
    no_convs = _save({"fc.weight": torch.ones(2, 2)}, tmp_path / "fc.pt")
    with pytest.raises(CheckpointError, match="no convolution weights"):
        filters_tool.count_filters([no_convs], [0.1])
    with pytest.raises(SystemExit) as exit_info:
        filters_tool.parse_args([no_convs, "-t", "0.1,zero"])
    assert exit_info.value.code == 2


def test_per_layer_breakdown_adds_up_to_the_totals(tmp_path, capsys):
    state = _resnet32_with_zeroed_filters(zeroed=8, small=6)  # 2 chosen filters per layer, from the first layer on
    path = _save(state, tmp_path / "r32.pt")
    [row] = filters_tool.count_filters([f"mine={path}"], [0.1, 0.01])
    keys = conv_filter_keys(state)
    assert list(row.layers) == keys
    for key in keys:  # each layer counted as the library counts that layer alone
        assert row.layers[key][0.1] == count_invalid_filters({key: state[key]}, 0.1)
    assert [row.layers[k][0.1][0] for k in keys[:5]] == [2, 2, 2, 2, 2]
    assert [row.layers[k][0.01][0] for k in keys[:5]] == [2, 2, 2, 2, 0]

    filters_tool.main([f"mine={path}", "--per-layer"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| layer | filters | mine, t = 0.1 | mine, t = 0.01 |"
    assert lines[2] == f"| {keys[0]} | {state[keys[0]].shape[0]} | 2 | 2 |"
    assert lines[-1] == "| all | 1136 | 14 | 8 |"
    assert len(lines) == 2 + len(keys) + 1


def test_a_nan_checkpoint_is_an_error_not_zero_invalid_filters(tmp_path, capsys):
    state = _resnet32_with_zeroed_filters(zeroed=0, small=0)
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    path = _save({"net": state}, tmp_path / "nan.t7")
    with pytest.raises(SystemExit) as exit_info:
        filters_tool.main([path])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "NaN or infinite values" in err and "layer1.0.conv1.weight" in err


def _run_folder_checkpoint(folder: Path, state: dict, **config) -> str:
    """``folder/net1/best.pt`` next to a config.json holding ``config``."""
    net = folder / "net1"
    net.mkdir(parents=True)
    (net / "config.json").write_text(json.dumps(config))
    return _save({"model": state, "acc": 50.0}, net / "best.pt")


def test_filters_of_a_stand_in_run_are_labelled(tmp_path, capsys):
    state = _resnet32_with_zeroed_filters(zeroed=3, small=0)
    fake = _run_folder_checkpoint(tmp_path / "fake", state, model="resnet32", generated_data=True)
    real = _run_folder_checkpoint(tmp_path / "real", state, model="resnet32", generated_data=False)
    filters_tool.main([f"fake={fake}", f"real={real}", "-t", "0.1", "--model", "resnet32"])
    out = capsys.readouterr().out
    assert "| fake (generated stand-in) | 3/1136 |" in out
    assert "| real | 3/1136 |" in out
    assert "generated stand-in: trained on generated data" in out and MARKER_NAME in out


# ----------------------------------------------------------------------------------------------
# Ensembles


class _FixedLogits(nn.Module):
    """Logits looked up from a table: the input is a one-hot sample index."""

    def __init__(self, table: list[list[float]]) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table, dtype=torch.float32), requires_grad=False)

    def forward(self, one_hot: torch.Tensor) -> torch.Tensor:
        return one_hot @ self.table


def test_ensemble_averages_probabilities_not_logits_or_votes():
    labels = torch.tensor([1, 0])
    # Sample 0: one network is very sure and wrong, two are fairly sure and right: the mean logit is
    # wrong, the mean probability right. Sample 1: one network is sure and right, two are unsure and
    # wrong: the majority vote is wrong, the mean probability right.
    first = _FixedLogits([[10, 0], [5, 0]])
    second = _FixedLogits([[0, 2], [0, 0.5]])
    third = _FixedLogits([[0, 2], [0, 0.5]])
    batches = [(torch.eye(2)[:1], labels[:1]), (torch.eye(2)[1:], labels[1:])]
    result = ensemble_tool.ensemble_accuracy([first, second, third], batches)
    assert result.members == [50.0, 50.0, 50.0]
    assert result.ensemble == 100.0
    assert result.images == 2
    alone = ensemble_tool.ensemble_accuracy([first], batches)  # a lone network is its own ensemble
    assert alone.ensemble == alone.members[0] == 50.0
    with pytest.raises(UsageError):
        ensemble_tool.ensemble_accuracy([], batches)


def _fake_cifar(tmp_path: Path) -> Path:
    return write_fake_cifar(tmp_path / "data", num_classes=10, train_size=20, test_size=60)


def test_ensemble_cli_on_generated_cifar(tmp_path, capsys):
    data = _fake_cifar(tmp_path)
    loader = ensemble_tool.cifar_test_loader(data, 10, batch_size=25)
    torch.manual_seed(1)
    nets = [models.create("resnet20", num_classes=10) for _ in range(2)]
    for net in nets:
        # Fresh networks answer one class everywhere: batch-norm statistics of the data and a wide
        # random classifier make their answers vary from image to image and between the two.
        classifier = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
        nn.init.normal_(classifier.weight, std=5.0)
        net.train()
        with torch.no_grad():
            for images, _ in loader:
                net(images)
    first = _save({"net": {f"module.{k}": v for k, v in nets[0].state_dict().items()}}, tmp_path / "a.t7")
    run = tmp_path / "run" / "net1"
    run.mkdir(parents=True)
    second = _save({"model": nets[1].state_dict(), "acc": 1.0}, run / "best.pt")
    (run / "config.json").write_text(
        json.dumps({"model": "resnet20", "num_classes": 10, "data": str(data), "generated_data": True})
    )

    # The expected numbers, computed here directly.
    expected = ensemble_tool.ensemble_accuracy(nets, loader)
    hits = 0
    with torch.no_grad():
        for images, labels in loader:
            mean = sum(net(images).softmax(1) for net in nets) / 2
            hits += int((mean.argmax(1) == labels).sum())
    assert math.isclose(expected.ensemble, 100.0 * hits / 60)
    assert expected.images == 60
    assert len(set(expected.members)) == 2, "the two networks should not agree everywhere"

    # The model, dataset and data folder come from the config.json next to the first checkpoint.
    ensemble_tool.main([second, first, "--device", "cpu", "--batch-size", "7"])
    out = capsys.readouterr().out
    assert f"| {second} (generated stand-in) | {expected.members[1]:.2f} |" in out
    assert f"| {first} | {expected.members[0]:.2f} |" in out
    assert f"| ensemble of 2 (mean softmax) | {expected.ensemble:.2f} |" in out
    assert f"top-1 on 60 GENERATED stand-in test images in {data}" in out
    assert f"{data} holds {MARKER_NAME}; it is not CIFAR-10" in out


def test_ensemble_cli_reports_a_checkpoint_of_another_model(tmp_path, capsys):
    data = _fake_cifar(tmp_path)
    path = _save(models.create("resnet20").state_dict(), tmp_path / "r20.pt")
    with pytest.raises(SystemExit) as exit_info:
        ensemble_tool.main([path, "--model", "resnet32", "--cifar", "10", "--data", str(data), "--device", "cpu"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit --model resnet32" in err
    with pytest.raises(SystemExit) as exit_info:
        ensemble_tool.main([path, "--data", str(data)])  # no config.json and no --model
    assert exit_info.value.code == 2
    assert "pass --model and --cifar" in capsys.readouterr().err


@pytest.mark.parametrize("stand_in", [True, False])
def test_ensemble_on_a_stand_in_shows_no_paper_row(stand_in, tmp_path, capsys, monkeypatch):
    data = _fake_cifar(tmp_path)
    if not stand_in:
        (data / MARKER_NAME).unlink()  # the same files, no longer marked: taken for CIFAR-10
    monkeypatch.setattr(ensemble_tool, "published_accuracy", lambda *args, **kwargs: 94.09)
    path = _save(models.create("resnet20").state_dict(), tmp_path / "r20.pt")
    ensemble_tool.main([path, path, "--model", "resnet20", "--cifar", "10", "--data", str(data), "--device", "cpu"])
    out = capsys.readouterr().out
    assert ("| paper: resnet20 2 models ensemble | 94.09 |" in out) is not stand_in
    assert ("GENERATED stand-in" in out) is stand_in
    assert ("top-1 on 60 CIFAR-10 test images" in out) is not stand_in


def test_ensemble_hints_name_its_own_flags_and_work_when_followed(tmp_path, capsys):
    data = _fake_cifar(tmp_path)
    path = _save(models.create("resnet20").state_dict(), tmp_path / "r20.pt")
    missing = tmp_path / "no-data"
    with pytest.raises(SystemExit) as exit_info:
        ensemble_tool.main([path, "--model", "resnet20", "--cifar", "10", "--data", str(missing), "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--download" not in err and "--data" in err, err
    # The command it suggests is one graft-data accepts, as printed.
    command = err.split("fetch it there with: ")[1].split()
    assert command[:2] == ["graft-data", "download"]
    args = data_tool.parse_args(command[1:])
    assert (args.command, args.folder, args.cifar) == ("download", str(missing), [10])
    # Following the --data advice with the folder that holds CIFAR works.
    ensemble_tool.main([path, "--model", "resnet20", "--cifar", "10", "--data", str(data), "--device", "cpu"])
    assert "ensemble of 1" in capsys.readouterr().out


def test_ensemble_refuses_a_nan_checkpoint_instead_of_scoring_chance(tmp_path, capsys):
    data = _fake_cifar(tmp_path)
    state = models.create("resnet20").state_dict()
    state["linear.weight"][0, 0] = float("inf")
    path = _save(state, tmp_path / "inf.pt")
    with pytest.raises(SystemExit) as exit_info:
        ensemble_tool.main([path, "--model", "resnet20", "--cifar", "10", "--data", str(data), "--device", "cpu"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "NaN or infinite values" in err and "linear.weight" in err


@pytest.mark.parametrize(
    "config, message",
    [
        ({"model": "resnet999", "num_classes": 10}, "records model 'resnet999'"),
        ({"model": "resnet20", "num_classes": "ten"}, "'num_classes' is 'ten', not a whole number"),
        ({"model": "resnet20", "num_classes": 7}, "records 7 classes"),
        ({"model": ["resnet20"], "num_classes": 10}, "'model' is ['resnet20'], not text"),
        ({"model": "resnet20", "num_classes": 10, "data": "gone"}, "the data folder gone"),
    ],
)
def test_ensemble_reports_a_hand_edited_config_in_one_line(config, message, tmp_path, capsys):
    path = _run_folder_checkpoint(tmp_path / "run", models.create("resnet20").state_dict(), **config)
    with pytest.raises(SystemExit):
        ensemble_tool.main([path, "--device", "cpu"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_ensemble_reports_a_hand_edited_checkpoint_in_one_line(tmp_path, capsys):
    data = _fake_cifar(tmp_path)
    cases = {"list.pt": [1, 2, 3], "strings.pt": {"model": {"conv1.weight": "zero"}}, "text.pt": None}
    for name, content in cases.items():
        path = tmp_path / name
        if content is None:
            path.write_text("edited by hand")
        else:
            torch.save(content, path)
        with pytest.raises(SystemExit) as exit_info:
            ensemble_tool.main([str(path), "--model", "resnet20", "--cifar", "10", "--data", str(data)])
        assert exit_info.value.code == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(path) in err, err


# ----------------------------------------------------------------------------------------------
# Run-folder summaries


CIFAR10 = {
    "dataset": "cifar10",
    "num_classes": 10,
    "epochs": 200,
    "a": 0.4,
    "c": 500.0,
    "level": "layer",
    "criterion": "entropy",
    "source": "external",
    "distill": "none",
    "generated_data": False,
}


def _write_run(
    folder: Path, config: dict, networks: list[dict[int, float | tuple[float, float]]], alive: list[bool] | None = None
) -> Path:
    """A run folder as the training scripts leave it: per network config.json and metrics.jsonl (one record
    per given epoch: test top-1, or (top-1, top-5)), and heartbeat files for the networks marked alive
    (a stale one, an hour old, for the others that are not)."""
    for net, accuracies in enumerate(networks, start=1):
        sub = folder / f"net{net}"
        sub.mkdir(parents=True)
        (sub / "config.json").write_text(json.dumps({**config, "i": net, "num": len(networks)}))
        lines = []
        for epoch, acc in accuracies.items():
            top1, top5 = acc if isinstance(acc, tuple) else (acc, None)
            lines.append(
                json.dumps(
                    {"epoch": epoch, "epochs": config["epochs"], "test_acc": top1, "test_acc5": top5, "train_loss": 1.0}
                )
            )
        (sub / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
        if alive is not None:
            heartbeat = folder / f"net{net}.alive"
            heartbeat.write_text("0\n")
            if not alive[net - 1]:
                old = heartbeat.stat().st_mtime - 3600
                os.utime(heartbeat, (old, old))
    (folder / "tb").mkdir()
    return folder


@pytest.fixture
def cifar_runs(tmp_path) -> Path:
    runs = tmp_path / "runs"
    base, slr = {**CIFAR10, "model": "resnet32", "difflr": False, "cos": False}, {"difflr": False, "cos": False}
    _write_run(runs / "r32_base", base, [{1: 50.0, 150: 92.5, 200: 92.4}])
    _write_run(runs / "r32_slr", {**base, **slr}, [{1: 50.0, 180: 93.4, 200: 93.3}, {1: 51.0, 190: 93.2, 200: 93.1}])
    _write_run(runs / "r32_dlr", {**base, "difflr": True, "cos": True}, [{200: 94.0}, {200: 93.9}])
    _write_run(
        runs / "fake" / "r32_dlr",
        {**base, "difflr": True, "cos": True, "generated_data": True},
        [{200: 99.0}, {200: 98.0}],
    )
    _write_run(
        runs / "deep" / "mnv2_x3",
        {**CIFAR10, "dataset": "cifar100", "num_classes": 100, "model": "mobilenetv2", "difflr": True, "cos": True},
        [{1: 10.0, 57: 70.0}, {57: 71.0}, {56: 72.0}],
        alive=[True, True, True],
    )
    _write_run(runs / "r56_slr", {**CIFAR10, "model": "resnet56", **slr}, [{30: 80.0}, {31: 81.0}], alive=[False, True])
    _write_run(runs / "r56_base_short", {**CIFAR10, "model": "resnet56", "epochs": 3, **slr}, [{3: 40.0}])
    return runs


def test_summary_groups_experiments_and_compares_only_what_is_comparable(cifar_runs, capsys):
    summary_tool.main([str(cifar_runs)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        "| model | dataset | method | nets | epochs | status | best top-1 | final top-1 | gain | paper | diff | run |"
    )
    table = [line for line in lines if line.startswith("| ") and not line.startswith("| model")]
    assert table == [
        "| mobilenetv2 | cifar100 | dlr x3 | 3 | 200 | running 56/200 | 71.00 ± 1.00 | - | - | 76.21 | - "
        "| deep/mnv2_x3 |",
        # the baseline first, then slr and dlr; gain over the baseline; diff only for finished real runs
        "| resnet32 | cifar10 | baseline | 1 | 200 | done | 92.50 | 92.40 | - | 92.83 | -0.33 | r32_base |",
        "|  |  | slr | 2 | 200 | done | 93.30 ± 0.14 | 93.20 ± 0.14 | +0.80 | 93.33 | -0.03 | r32_slr |",
        "|  |  | dlr | 2 | 200 | done | 93.95 ± 0.07 | 93.95 ± 0.07 | +1.45 | 93.94 | +0.01 | r32_dlr |",
        # a stand-in is its own experiment and never compared with the paper (today: 98.50 | 93.94 | +4.56)
        "| resnet32 | cifar10 (generated stand-in) | dlr | 2 | 200 | done | 98.50 ± 0.71 | 98.50 ± 0.71 | - | - | - "
        "| fake/r32_dlr |",
        # done: every epoch it was given trained; the paper's 200 were not, so no diff
        "| resnet56 | cifar10 | baseline | 1 | 3 | done | 40.00 | 40.00 | - | 93.50 | - | r56_base_short |",
        "|  |  | slr | 2 | 200 | failed 30/200 | 80.50 ± 0.71 | - | - | 94.28 | - | r56_slr |",
    ]
    assert any("generated stand-in: trained on data written by grafting.data.fake" in line for line in lines)


def test_summary_formats_hold_the_same_numbers(cifar_runs, capsys):
    rows = summary_tool.summary_rows(runs_tool.find_runs([cifar_runs]), cifar_runs)
    summary_tool.main([str(cifar_runs), "--format", "json"])
    as_json = json.loads(capsys.readouterr().out)
    assert as_json == json.loads(json.dumps(rows))
    slr = next(row for row in as_json if row["run"] == "r32_slr")
    assert slr["best_per_network"] == [93.4, 93.2] and slr["final_per_network"] == [93.3, 93.1]
    assert slr["gain"] == pytest.approx(0.8) and slr["diff"] == pytest.approx(-0.03)
    assert slr["status"] == "done" and slr["generated_stand_in"] is False

    summary_tool.main([str(cifar_runs), "--format", "csv"])
    import csv
    import io

    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [row["run"] for row in table] == [row["run"] for row in rows]
    fake = next(row for row in table if row["run"] == "fake/r32_dlr")
    assert (fake["generated_stand_in"], fake["paper"], fake["diff"], fake["best_per_network"]) == (
        "True",
        "",
        "",
        "99.0;98.0",
    )
    assert float(next(row for row in table if row["run"] == "r32_dlr")["gain"]) == pytest.approx(1.45)


def test_summary_of_imagenet_recipes_shows_top5(tmp_path, capsys):
    runs = tmp_path / "imagenet"
    recipe = {
        "model": "resnet18",
        "dataset": "imagefolder",
        "num_classes": 1000,
        "epochs": 90,
        "steplr": False,
        "cos": True,
        "generated_data": False,
    }
    _write_run(runs / "r18_base", recipe, [{90: (69.5, 89.0)}])
    _write_run(runs / "r18", recipe, [{45: (71.3, 90.3), 90: (71.0, 90.0)}, {90: (71.4, 90.2)}])
    _write_run(runs / "small", {**recipe, "num_classes": 3, "epochs": 2}, [{2: (60.0, None)}])
    summary_tool.main([str(runs)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        "| model | dataset | method | nets | epochs | status | best top-1 | final top-1 | best top-5 "
        "| final top-5 | gain | paper | diff | paper top-5 | diff top-5 | run |"
    )
    assert (
        "| resnet18 | imagefolder (3 classes) | baseline | 1 | 2 | done | 60.00 | 60.00 | - | - | - | - | - | - "
        "| - | small |"
    ) in lines
    assert (
        "| resnet18 | imagenet | baseline | 1 | 90 | done | 69.50 | 69.50 | 89.00 | 89.00 | - | 69.15 | +0.35 "
        "| 88.87 | +0.13 | r18_base |"
    ) in lines
    assert (
        "|  |  | grafting | 2 | 90 | done | 71.35 ± 0.07 | 71.20 ± 0.28 | 90.25 ± 0.07 | 90.10 ± 0.14 | +1.85 "
        "| 71.19 | +0.16 | 90.01 | +0.24 | r18 |"
    ) in lines


def test_summary_of_a_single_run_folder_names_it(tmp_path, capsys):
    folder = _write_run(
        tmp_path / "r20",
        {**CIFAR10, "model": "resnet20", "epochs": 2, "difflr": True},
        [{}, {1: 40.0}],
        alive=[False, False],
    )
    [run] = runs_tool.find_runs([folder])
    assert run.folder == folder and run.method == "dlr" and run.published is None
    summary_tool.main([str(folder)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| resnet20 | cifar10 | dlr | 2 | 2 | failed 0/2 | - | - | - | - | - | r20 |"


def test_summary_counts_networks_that_never_started(tmp_path):
    folder = _write_run(tmp_path / "r", {**CIFAR10, "model": "resnet20", "epochs": 2}, [{1: 40.0}], alive=[True])
    config = json.loads((folder / "net1" / "config.json").read_text())
    (folder / "net1" / "config.json").write_text(json.dumps({**config, "num": 2}))
    [run] = runs_tool.find_runs([folder])
    assert [n.net for n in run.networks] == [1, 2]
    assert run.status == "failed 0/2"  # network 2 has neither a heartbeat nor a record


def test_summary_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        summary_tool.main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no runs" in capsys.readouterr().err
    with pytest.raises(UsageError, match="is not a folder"):
        runs_tool.find_runs([tmp_path / "nowhere"])
    bad = tmp_path / "bad" / "net1"
    bad.mkdir(parents=True)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is unreadable"):
        runs_tool.find_runs([tmp_path])


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda d: (d / "net1" / "config.json").write_text('{"model": "resnet20", "epochs": "abc", "num": 1}'),
            "'epochs' is 'abc', not a whole number",
        ),
        (
            lambda d: (d / "net1" / "config.json").write_text('{"model": "resnet20", "epochs": 2, "num": 1, "a": "x"}'),
            "'a' is 'x', not a number",
        ),
        (lambda d: (d / "net1" / "config.json").write_text("[]"), "does not hold a settings object"),
        (lambda d: (d / "net1" / "config.json").write_text('{"epochs": 2, "num": 1000000000}'), "not a ring size"),
        (
            lambda d: (d / "net1" / "metrics.jsonl").write_text('{"epoch": 1, "test_acc": "high"}\n'),
            "line 1: 'test_acc' is 'high', not a number",
        ),
        (
            lambda d: (d / "net1" / "metrics.jsonl").write_text('{"epoch": "one", "test_acc": 5}\n'),
            "line 1: 'epoch' is 'one', not a whole number",
        ),
        (lambda d: (d / "net1" / "metrics.jsonl").write_text('{"loss": 1}\n'), "no 'epoch' or 'test_acc'"),
        (
            lambda d: [(d / "net1" / "metrics.jsonl").unlink(), (d / "net1" / "metrics.jsonl").mkdir()],
            "metrics.jsonl (is a directory, not a file); move it away",
        ),
        (lambda d: (d / "net1" / "metrics.jsonl").write_bytes(b"\xff\xfe{"), "cannot read"),
    ],
)
def test_summary_reports_hand_edited_files_in_one_line(edit, message, tmp_path, capsys):
    folder = _write_run(tmp_path / "r", {**CIFAR10, "model": "resnet20", "epochs": 2}, [{1: 40.0, 2: 41.0}])
    edit(folder)
    with pytest.raises(SystemExit) as exit_info:
        summary_tool.main([str(folder)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_two_different_stand_ins_are_two_experiments(tmp_path, capsys):
    runs = tmp_path / "runs"
    stand_in = {**CIFAR10, "model": "resnet20", "epochs": 2, "generated_data": True, "difflr": True}
    small = {**stand_in, "stand_in": "CIFAR-10 layout, 1000 train and 200 test images, seed 0"}
    large = {**stand_in, "stand_in": "CIFAR-10 layout, 2000 train and 500 test images, seed 0"}
    _write_run(runs / "small_base", small, [{2: 30.0}])
    _write_run(runs / "small_dlr", small, [{2: 40.0}, {2: 42.0}])
    _write_run(runs / "large_base", large, [{2: 60.0}])
    _write_run(runs / "large_dlr", large, [{2: 61.0}, {2: 61.0}])
    summary_tool.main([str(runs)])
    table = [line for line in capsys.readouterr().out.splitlines() if "| resnet20 |" in line or "|  |  |" in line]
    assert table == [
        # each stand-in is its own experiment with its own baseline (today: one experiment, gain +11.00 for both)
        "| resnet20 | cifar10 (generated stand-in: CIFAR-10 layout, 1000 train and 200 test images, seed 0) "
        "| baseline | 1 | 2 | done | 30.00 | 30.00 | - | - | - | small_base |",
        "|  |  | dlr | 2 | 2 | done | 41.00 ± 1.41 | 41.00 ± 1.41 | +11.00 | - | - | small_dlr |",
        "| resnet20 | cifar10 (generated stand-in: CIFAR-10 layout, 2000 train and 500 test images, seed 0) "
        "| baseline | 1 | 2 | done | 60.00 | 60.00 | - | - | - | large_base |",
        "|  |  | dlr | 2 | 2 | done | 61.00 ± 0.00 | 61.00 ± 0.00 | +1.00 | - | - | large_dlr |",
    ]


def test_a_stand_in_describes_itself(tmp_path):
    from grafting.data.fake import stand_in_description, write_fake_imagefolder

    cifar = write_fake_cifar(tmp_path / "c", 10, train_size=20, test_size=10, seed=3)
    folder = write_fake_imagefolder(tmp_path / "f", 2, train_per_class=1, val_per_class=1, image_size=16, seed=4)
    assert stand_in_description(cifar) == "CIFAR-10 layout, 20 train and 10 test images, seed 3"
    assert stand_in_description(folder) == (
        "ImageFolder layout, 2 classes, 1 train and 1 val images per class, 16 pixels, seed 4"
    )
    assert stand_in_description(tmp_path) is None  # real data: no marker
    (tmp_path / MARKER_NAME).write_text("made by hand\n")
    assert stand_in_description(tmp_path) == ""  # the training scripts' config.json: tests/test_train_*.py


def test_done_means_every_epoch_trained_on_every_dataset(tmp_path, capsys):
    runs = tmp_path / "runs"
    _write_run(runs / "cifar", {**CIFAR10, "model": "resnet20", "epochs": 2}, [{1: 30.0, 2: 35.0}])
    folder = {"model": "resnet18", "dataset": "imagefolder", "num_classes": 3, "epochs": 2, "steplr": False}
    _write_run(runs / "folder", folder, [{1: 50.0, 2: 55.0}])
    _write_run(runs / "imagenet", {**folder, "num_classes": 1000}, [{1: 5.0, 2: 9.0}])
    [cifar, folder_run, imagenet] = sorted(runs_tool.find_runs([runs]), key=lambda r: r.folder.name)
    # today: "partial 2/200" for CIFAR and "done" for the ImageFolder run of the same 2 epochs
    assert cifar.status == folder_run.status == imagenet.status == "done"
    assert not any(run.comparable for run in (cifar, folder_run, imagenet))  # not the paper's 200 / 90 epochs
    real = _write_run(tmp_path / "real", {**CIFAR10, "model": "resnet32", "num": 1}, [{200: 92.0}])
    [full] = runs_tool.find_runs([real])
    assert full.status == "done" and full.comparable
    longer = _write_run(tmp_path / "longer", {**CIFAR10, "model": "resnet32", "epochs": 300}, [{300: 94.0}])
    [run] = runs_tool.find_runs([longer])
    assert run.status == "done" and not run.comparable  # not the paper's recipe either


def test_footnotes_speak_only_of_the_columns_the_table_has(tmp_path, capsys):
    cifar = _write_run(tmp_path / "cifar", {**CIFAR10, "model": "resnet20", "epochs": 2}, [{2: (35.0, 90.0)}])
    summary_tool.main([str(cifar)])
    out = capsys.readouterr().out
    assert "top-5" not in out.lower()  # today: "best: highest test accuracy of any epoch (top-5 at that epoch)"
    assert "200 on cifar10" in out and "90 on imagenet" in out
    folder = {"model": "resnet18", "dataset": "imagefolder", "num_classes": 1000, "epochs": 2, "steplr": False}
    imagenet = _write_run(tmp_path / "imagenet", folder, [{2: (9.0, 20.0)}])
    summary_tool.main([str(imagenet)])
    out = capsys.readouterr().out
    assert "best top-5: the top-5 of that epoch" in out and "diff and diff top-5" in out
    assert "generated stand-in" not in out


def test_graft_filters_warns_when_the_papers_rows_are_for_another_model(tmp_path, capsys):
    torch.manual_seed(0)
    resnet20 = _run_folder_checkpoint(tmp_path / "r20", models.create("resnet20").state_dict(), model="resnet20")
    bare = _save(models.create("resnet20").state_dict(), tmp_path / "bare.pt")  # no config.json: by its filters
    resnet32 = _save(_resnet32_with_zeroed_filters(zeroed=0, small=0), tmp_path / "r32.pt")
    filters_tool.main([f"mine={resnet20}", f"bare={bare}", f"r32={resnet32}", "--model", "resnet32"])
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: the paper's rows are for resnet32, but mine is not a resnet32 (its config.json says resnet20); "
        "compare it with the paper's rows of its own model, if any",
        "warning: the paper's rows are for resnet32, but bare is not a resnet32 (it has 688 filters, resnet32 has "
        "1136); compare it with the paper's rows of its own model, if any",
    ]
    assert "| paper: resnet32 baseline | 36/1136 | 35/1136 |" in out  # the rows stay, the warning says what they are


def test_evaluate_flags_that_disagree_with_the_run_are_one_rule_for_every_value(tmp_path, capsys, in_process_logs):
    from grafting_imagenet import train as imagenet

    net1 = tmp_path / "run" / "net1"
    net1.mkdir(parents=True)
    (net1 / "config.json").write_text(json.dumps({"model": "squeezenet1_1", "image_size": 40, "num": 1, "i": 1}))
    (net1 / "best.pt").write_bytes(b"not read: the flags are checked first")
    common = [
        "--data",
        str(tmp_path / "no-data"),
        "--device",
        "cpu",
        "-j",
        "0",
        "-e",
        "--checkpoint",
        str(net1 / "best.pt"),
    ]
    # 224 and resnet18 are the flags' defaults: given explicitly they disagree with the run all the same
    # (today both were silently replaced by the run's values while --image-size 128 was an error)
    for flags, message in (
        (["--image-size", "224"], "--image-size 224 but"),
        (["--image-size", "128"], "--image-size 128 but"),
        (["-a", "resnet18"], "-a/--arch resnet18 but"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            imagenet.main([*common, *flags])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "leave" in err, err
    from grafting.train.cli import given_settings
    from grafting.train.config import ImagenetConfig

    config = imagenet.parse_args([*common, "--image-size=40"])
    assert given_settings(ImagenetConfig, [*common, "--image-size=40"]) >= {"image_size", "evaluate", "data"}
    assert imagenet.recipe_for_evaluation(config, net1 / "best.pt", frozenset({"image_size"})).model == "squeezenet1_1"


# ----------------------------------------------------------------------------------------------
# Where the runs are and whether they are alive


def test_symlinked_run_folders_are_listed_once(tmp_path):
    runs, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    recipe = {**CIFAR10, "model": "resnet20", "epochs": 2}
    _write_run(runs / "here", recipe, [{2: 30.0}])
    _write_run(elsewhere / "there", recipe, [{2: 31.0}])
    (runs / "there").symlink_to(elsewhere / "there")  # a run kept on another disk, linked in
    (runs / "latest").symlink_to(runs / "here")  # the same run under a second name
    (runs / "loop").symlink_to(runs)  # a loop must not hang the walk
    found = runs_tool.find_runs([runs])
    assert sorted(runs_tool.run_label(run, runs) for run in found) == ["here", "there"]  # today: ["here"]
    [linked] = runs_tool.find_runs([runs / "latest"])
    assert runs_tool.run_label(linked, runs / "latest") == "latest"


def test_a_reader_whose_clock_runs_ahead_still_sees_live_networks(tmp_path, monkeypatch):
    import time as real_time
    import types

    from grafting.ring import exchange

    folder = _write_run(tmp_path / "r", {**CIFAR10, "model": "resnet20", "epochs": 4}, [{1: 30.0}], alive=[True])
    [run] = runs_tool.find_runs([folder])
    assert run.status == "running 1/4"
    # This machine's clock 2 minutes ahead of the clock that stamps the folder's files (an NFS server's).
    ahead = types.SimpleNamespace(
        **{name: getattr(real_time, name) for name in dir(real_time) if not name.startswith("_")}
    )
    ahead.time = lambda: real_time.time() + 150.0
    monkeypatch.setattr(exchange, "time", ahead)
    monkeypatch.setattr(exchange, "_CLOCK_OFFSETS", {}, raising=False)  # nothing measured yet
    [run] = runs_tool.find_runs([folder])
    assert run.status == "running 1/4"  # today: "failed 1/4", the heartbeat taken for 150 s old
    assert exchange.heartbeat_age(folder / "net1.alive") < 10
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".clock")]  # the probe file is gone


# ----------------------------------------------------------------------------------------------
# --help of every command: each flag shows its default and what it means


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from grafting.train.cli import build_parser
    from grafting.train.config import CifarConfig, ImagenetConfig

    parsers = {
        "graft-cifar": build_parser(CifarConfig, "graft-cifar", ""),
        "graft-imagenet": build_parser(ImagenetConfig, "graft-imagenet", ""),
    }
    for name, module in (
        ("graft-summary", summary_tool),
        ("graft-filters", filters_tool),
        ("graft-ensemble", ensemble_tool),
        ("graft-plot", plot_tool),
        ("graft-data", data_tool),
    ):
        captured = {}

        def keep(self, *args, _name=name, _captured=captured, **kwargs):  # the parser a tool builds, unrun
            _captured.setdefault(_name, self)
            raise SystemExit(0)

        original = argparse.ArgumentParser.parse_args
        argparse.ArgumentParser.parse_args = keep
        try:
            with pytest.raises(SystemExit):
                module.parse_args(["x"])
        finally:
            argparse.ArgumentParser.parse_args = original
        parsers[name] = captured[name]
    return parsers


def _actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{name} {flag}", help_) for flag, help_ in _actions(sub))
        elif action.option_strings and not isinstance(action, argparse._HelpAction):
            yield action.option_strings[-1], action.help or ""


def test_every_flag_of_every_command_shows_its_default_and_meaning():
    missing = []
    for command, parser in _parsers().items():
        for flag, help_text in _actions(parser):
            if "default" not in help_text or len(help_text.split("(default")[0].strip()) < 8:
                missing.append(f"{command} {flag}: {help_text!r}")
    assert not missing, "flags without a default or a meaning in --help:\n" + "\n".join(missing)


# ----------------------------------------------------------------------------------------------
# graft-data: the download command of docs/training.md and the stand-in generators


def _readme_command(start: str) -> list[str]:
    """The arguments of docs/training.md's first command line that starts with ``start`` (comment removed)."""
    readme = (Path(__file__).resolve().parent.parent / "docs" / "training.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith(start))
    return line.split("#")[0].split()[1:]


def test_the_readme_download_command_fails_in_one_line_offline(tmp_path, capsys, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.chdir(tmp_path)
    argv = _readme_command("graft-data download")
    assert argv[:2] == ["download", "data"]
    with pytest.raises(SystemExit) as exit_info:
        data_tool.main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: could not download CIFAR-10 into data")
    assert "cifar-10-python.tar.gz" in err and "--download" not in err


@pytest.mark.parametrize("command", ["stand-in-cifar", "stand-in-imagefolder"])
def test_a_stand_in_never_overwrites_a_real_dataset(command, tmp_path, capsys):
    real = write_fake_cifar(tmp_path / "data", 10, train_size=10, test_size=10)
    (real / MARKER_NAME).unlink()  # what the project takes for the real CIFAR-10
    (real / "train").mkdir()  # and an ImageFolder's train/
    before = {p: p.read_bytes() for p in real.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exit_info:
        data_tool.main([command, str(real), "--train-size" if command == "stand-in-cifar" else "--classes", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "without the marker" in err and "pass another folder" in err, err
    assert {p: p.read_bytes() for p in real.rglob("*") if p.is_file()} == before and not (real / MARKER_NAME).exists()
    if command != "stand-in-cifar":
        return
    # real CIFAR is never downloaded into a stand-in's folder either: the marker would label it generated
    stand_in = write_fake_cifar(tmp_path / "stand-in", 10, train_size=10, test_size=10)
    with pytest.raises(SystemExit) as exit_info:
        data_tool.main(["download", str(stand_in)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a generated stand-in" in err and "pass another folder" in err, err
    # over a stand-in (it has the marker), a new stand-in is written as asked
    data_tool.main(["stand-in-cifar", str(stand_in), "--train-size", "20", "--test-size", "5"])
    assert "20 train and 5 test images" in (stand_in / MARKER_NAME).read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["stand-in-cifar", "{file}"], "{file} is a file, not a folder"),
        (["stand-in-imagefolder", "{file}"], "{file} is a file, not a folder"),
        (
            ["stand-in-imagefolder", "big", "--image-size", "100000"],
            "argument --image-size: 100000 must lie in 8..1024",
        ),
        (["stand-in-imagefolder", "big", "--image-size", "4"], "argument --image-size: 4 must lie in 8..1024"),
        (["stand-in-cifar", "s", "--seed", "-1"], "argument --seed: -1 must be at least 0"),
        (["download", "{file}"], "{file} is a file, not a folder; pass the folder CIFAR should go into"),
    ],
)
def test_graft_data_refuses_bad_places_and_sizes_in_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("keep me")
    argv = [a.replace("{file}", "a-file") for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        data_tool.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.replace("{file}", "a-file") in err, err
    assert (tmp_path / "a-file").read_text() == "keep me" and not (tmp_path / "big").exists()


def test_the_readme_stand_in_commands_write_marked_datasets(tmp_path, capsys, monkeypatch):
    from grafting.data.cifar import load_cifar
    from grafting.data.fake import is_generated_stand_in

    monkeypatch.chdir(tmp_path)
    cifar = _readme_command("graft-data stand-in-cifar")
    data_tool.main(cifar + ["--train-size", "20", "--test-size", "10"])
    train, test = load_cifar(cifar[1], 10)
    assert (len(train), len(test)) == (20, 10) and is_generated_stand_in(cifar[1])
    folder = _readme_command("graft-data stand-in-imagefolder")
    data_tool.main(folder + ["--train-per-class", "2", "--val-per-class", "1"])
    assert len(list((tmp_path / folder[1] / "train").iterdir())) == 10 and is_generated_stand_in(folder[1])
    out = capsys.readouterr().out
    assert f"train with --data {cifar[1]}" in out and f"graft-imagenet --data {folder[1]} --image-size 64" in out
