"""The comparison tools (grafting/tools/): invalid-filter tables, ensembles, run-folder summaries.

Every input is generated here with an answer known by construction: checkpoints with chosen
filters zeroed, networks whose logits are a fixed table, run folders written by hand.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from grafting.archs import cifar_models as models
from grafting.tools import ensemble as ensemble_tool, filters as filters_tool, published as published_tool, runs as runs_tool, summary as summary_tool
from grafting.data.fake import write_fake_cifar
from grafting.errors import CheckpointError, UsageError

torch.set_num_threads(1)


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


@pytest.mark.parametrize("config, label", [
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
    ({"num": 2, "steplr": False, "cos": True}, "cos"),  # the ImageNet script: cosine unless --steplr
    ({"num": 2, "steplr": True, "cos": False}, "slr"),
])
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
    rows = [filters_tool.FilterRow("baseline", {0.1: (36, 1136), 0.01: (35, 1136)}),
            filters_tool.FilterRow("grafted", {0.1: (14, 1136), 0.01: (8, 1136)})]
    assert filters_tool.filter_table(rows, [0.1, 0.01], model="resnet32").splitlines() == [
        "| checkpoint | t = 0.1 | t = 0.01 |",
        "|---|---|---|",
        "| baseline | 36/1136 | 35/1136 |",
        "| grafted | 14/1136 | 8/1136 |",
        "| paper: resnet32 baseline | 36/1136 | 35/1136 |",
        "| paper: resnet32 grafting | 14/1136 | 8/1136 |",
    ]
    assert "| paper: resnet20 baseline | - |" in filters_tool.filter_table(rows, [0.1], model="resnet20")


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
    (run / "config.json").write_text(json.dumps({"model": "resnet20", "num_classes": 10}))

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

    # The model and dataset come from the config.json next to the first checkpoint.
    ensemble_tool.main([second, first, "--data", str(data), "--device", "cpu", "--batch-size", "7"])
    out = capsys.readouterr().out
    assert f"| {second} | {expected.members[1]:.2f} |" in out
    assert f"| {first} | {expected.members[0]:.2f} |" in out
    assert f"| ensemble of 2 (mean softmax) | {expected.ensemble:.2f} |" in out
    assert "top-1 on 60 CIFAR-10 test images" in out


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


# ----------------------------------------------------------------------------------------------
# Run-folder summaries


def _write_run(folder: Path, config: dict, results: list[tuple[float | None, float | None, int]]) -> None:
    """A run folder as the training scripts leave it: per network config.json, best.pt, last.pt."""
    for net, (best, final, epoch) in enumerate(results, start=1):
        sub = folder / f"net{net}"
        sub.mkdir(parents=True)
        (sub / "config.json").write_text(json.dumps({**config, "i": net}))
        if best is not None:
            torch.save({"model": {}, "epoch": epoch, "acc": best}, sub / "best.pt")
        torch.save({"format": "filter-grafting/1", "epoch": epoch, "best_acc": best, "acc": final}, sub / "last.pt")
    (folder / "tb").mkdir()


def test_summary_of_generated_run_folders(tmp_path, capsys):
    runs = tmp_path / "runs"
    cifar = {"dataset": "cifar10", "num_classes": 10, "epochs": 200, "a": 0.4, "c": 500.0, "level": "layer",
             "criterion": "entropy", "source": "external", "distill": "none"}
    _write_run(runs / "r32_dlr", {**cifar, "model": "resnet32", "num": 2, "difflr": True, "cos": True},
               [(94.00, 93.80, 200), (93.90, 93.70, 200)])
    _write_run(runs / "r32_base", {**cifar, "model": "resnet32", "num": 1, "difflr": False, "cos": False},
               [(92.50, 92.40, 200)])
    _write_run(runs / "deep" / "mnv2_x3", {**cifar, "dataset": "cifar100", "model": "mobilenetv2", "num": 3,
                                           "difflr": True, "cos": True},
               [(70.0, None, 57), (71.0, None, 57), (72.0, None, 56)])
    _write_run(runs / "r18", {"model": "resnet18", "arch": "resnet18", "dataset": "imagefolder",
                              "num_classes": 1000, "epochs": 90, "num": 2, "steplr": False, "cos": True},
               [(71.0, 70.9, 90), (71.4, 71.2, 90)])

    found = runs_tool.find_runs([runs])
    assert [(r.model, r.dataset, r.method) for r in found] == [
        ("mobilenetv2", "cifar100", "dlr x3"), ("resnet18", "imagenet", "cos"),
        ("resnet32", "cifar10", "baseline"), ("resnet32", "cifar10", "dlr")]
    mnv2, r18, base, dlr = found
    assert math.isclose(dlr.mean_best, 93.95) and math.isclose(dlr.mean_final, 93.75)
    assert dlr.published == 93.94
    assert mnv2.mean_best == 71.0 and mnv2.mean_final is None  # not finished: no final accuracy
    assert mnv2.published == 76.21
    assert r18.published == 71.19
    assert base.published == 92.83

    summary_tool.main([str(runs)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("| run | model | dataset | method | epochs | best | final | mean best | mean final "
                        "| paper | diff |")
    assert ("| deep/mnv2_x3 | mobilenetv2 | cifar100 | dlr x3 | 56/200 | 70.00 / 71.00 / 72.00 | - / - / - "
            "| 71.00 | - | 76.21 | -5.21 |") in lines
    assert "| r32_dlr | resnet32 | cifar10 | dlr | 200/200 | 94.00 / 93.90 | 93.80 / 93.70 | 93.95 | 93.75 " \
           "| 93.94 | +0.01 |" in lines
    assert "| r32_base | resnet32 | cifar10 | baseline | 200/200 | 92.50 | 92.40 | 92.50 | 92.40 | 92.83 | -0.33 |" in lines
    assert "| r18 | resnet18 | imagenet | cos | 90/90 | 71.00 / 71.40 | 70.90 / 71.20 | 71.20 | 71.05 | 71.19 | +0.01 |" \
        in lines


def test_summary_of_a_single_run_folder_and_of_an_unknown_row(tmp_path):
    folder = tmp_path / "r20"
    _write_run(folder, {"model": "resnet20", "dataset": "cifar10", "epochs": 2, "num": 2, "difflr": True},
               [(None, None, 1), (40.0, None, 1)])
    [run] = runs_tool.find_runs([folder])
    assert run.folder == folder and run.method == "dlr" and run.published is None
    table = summary_tool.summary_table([run], base=folder)
    assert table.splitlines()[2] == "| . | resnet20 | cifar10 | dlr | 1/2 | - / 40.00 | - / - | - | - | - | - |"


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
