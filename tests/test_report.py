"""What a run reports after each epoch (grafting/train/report.py, tensorboard.py, loop.epoch_record): the
epoch line, metrics.jsonl and the TensorBoard event file, in this process on hand-made records."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from grafting.archs import cifar_models as models
from grafting.method.filters import count_invalid_filters
from grafting.method.graft import FilterRecord, LayerRecord
from grafting.ring.exchange import format_duration
from grafting.ring.grafter import GraftReport
from grafting.train.loop import EpochStats, epoch_record, evaluate, paper_filter_norms, train_one_epoch
from grafting.train.report import EpochRecord, RunReporter, read_metrics
from grafting.train.tensorboard import STAND_IN_NOTE, filter_norm_picture, picture_epochs


def grafted_record(**changes) -> EpochRecord:
    """Epoch 3 of 10 of a grafting network, every field with a value of its own."""
    values = {
        "epoch": 3,
        "epochs": 10,
        "train_loss": 1.2345,
        "train_acc": 55.5,
        "test_loss": 1.3456,
        "test_acc": 52.25,
        "best_acc": 53.5,
        "lr": 0.0875,
        "test_acc5": 91.75,
        "loss_parts": {"ce": 1.1, "kd": 0.1345},
        "grafted": True,
        "peer": 2,
        "waited_s": 12.3,
        "graft_ms": 45.6,
        "train_images_per_s": 812.0,
        "test_images_per_s": 3100.0,
        "epoch_s": 65.0,
        "elapsed_s": 185.0,
        "eta_s": 455.0,
        "gpu_memory_gib": 1.5,
        "alpha_mean": 0.5125,
        "alpha_min": 0.3,
        "alpha_max": 0.7,
        "alphas": {"conv1.weight": 0.3, "layer1.0.conv1.weight": 0.7, "layer1.0.conv2.weight": 0.5375},
        "entropies": {"conv1.weight": 1.9},
        "peer_entropies": {"conv1.weight": 2.1},
        "invalid_filters": {"0.1": 14, "0.01": 8},
        "total_filters": 1136,
    }
    values.update(changes)
    return EpochRecord(**values)


# ----------------------------------------------------------------------------------------------
# The epoch line


def test_epoch_line_names_its_numbers():
    line = grafted_record().line("[net 1/2] ")
    assert line.startswith("[net 1/2] epoch 3/10 | train loss 1.2345 acc 55.50 (ce 1.1000 kd 0.1345) |")
    assert "| lr 0.08750 (epoch start) |" in line
    assert "| wait 12.3 s | graft 45.6 ms |" in line
    assert "| alpha mean 0.512 min 0.300 max 0.700 |" in line
    assert "| invalid 14/1136 (l1 < 0.1) |" in line
    assert "| 812 img/s (test 3100) | mem 1.50 GiB |" in line
    assert line.endswith("| elapsed 3m05s | ETA 7m35s")


def test_final_and_filter_level_epochs():
    final = grafted_record(epoch=10, grafted=False, graft_ms=None, alphas={}, alpha_mean=None, eta_s=0.0).line()
    assert "| no graft (last epoch) |" in final and "graft " not in final.replace("no graft", "")
    assert "alpha" not in final and "ETA" not in final and final.endswith("| elapsed 3m05s")
    baseline = grafted_record(epoch=4, grafted=False, graft_ms=None, alphas={}, alpha_mean=None).line()
    assert "| no graft |" in baseline
    filters = grafted_record(
        alphas={}, filter_weights={"conv1.weight": 0.4}, alpha_mean=0.4, alpha_min=0.4, alpha_max=0.4
    ).line()
    assert "| filter w mean 0.400 min 0.400 max 0.400 |" in filters
    no_convs = grafted_record(invalid_filters={}, total_filters=0).line()  # keys never say 'conv'
    assert "invalid" not in no_convs


def _numbers(value, out: list[float]) -> list[float]:
    """Every number in a JSON value, dict keys that are numbers included."""
    if isinstance(value, dict):
        for key, item in value.items():
            with contextlib.suppress(ValueError):
                out.append(float(key))
            _numbers(item, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out.append(float(value))
    return out


def test_every_number_of_the_epoch_line_is_in_metrics_jsonl():
    record = grafted_record()
    saved = json.loads(record.to_json())
    line = record.line()
    # Durations are printed as 3m05s: they must be the formatted elapsed and ETA fields.
    durations = re.findall(r"(elapsed|ETA) (\S+)", line)
    assert durations == [("elapsed", format_duration(saved["elapsed_s"])), ("ETA", format_duration(saved["eta_s"]))]
    rest = re.sub(r"(elapsed|ETA) \S+", "", line)
    known = _numbers(saved, [])
    for token in re.findall(r"(?<![\w.])\d+(?:\.\d+)?", rest):  # not the 5 of top5 or the 1 of l1
        digits = len(token.split(".")[1]) if "." in token else 0
        assert any(round(value, digits) == float(token) for value in known), f"{token} of the line is not in {saved}"


# ----------------------------------------------------------------------------------------------
# epoch_record: from the grafting step and the model


def test_epoch_record_summarises_the_grafting_step_and_counts_invalid_filters():
    torch.manual_seed(0)
    model = models.create("resnet20")
    with torch.no_grad():
        model.conv1.weight[:3].zero_()  # three invalid filters
    layers = [LayerRecord("conv1.weight", 1.5, 1.7, 0.35), LayerRecord("layer1.0.conv1.weight", 2.0, 1.0, 0.65)]
    report = GraftReport(epoch=2, peer=2, waited_s=0.5, graft_ms=12.0, layers=layers, grafted=True)
    stats = EpochStats(loss=1.0, top1=50.0, top5=None, images_per_s=100.0)
    record = epoch_record(
        2, 5, stats, stats, best_acc=50.0, lr=0.1, report=report, model=model, epoch_s=3.0, elapsed_s=6.0, eta_s=9.0
    )
    assert (record.alpha_mean, record.alpha_min, record.alpha_max) == (pytest.approx(0.5), 0.35, 0.65)
    assert record.peer_entropies == {"conv1.weight": 1.7, "layer1.0.conv1.weight": 1.0}
    state = model.state_dict()
    assert record.invalid_filters == {str(t): count_invalid_filters(state, t)[0] for t in (0.1, 0.01)}
    assert record.invalid_filters["0.1"] == 3 and record.total_filters == count_invalid_filters(state, 0.1)[1]
    assert paper_filter_norms(model).numel() == record.total_filters
    assert (record.elapsed_s, record.eta_s) == (6.0, 9.0)

    filter_level = GraftReport(epoch=2, peer=2, layers=[FilterRecord("conv1.weight", 0.25, 0.1, 0.4)], grafted=True)
    record = epoch_record(2, 5, stats, stats, best_acc=50.0, lr=0.1, report=filter_level, model=model, epoch_s=3.0)
    assert record.filter_weights == {"conv1.weight": 0.25} and record.alpha_mean == 0.25 and not record.alphas


class _Logits(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


@pytest.mark.parametrize("classes, shows_top5", [(3, False), (5, False), (10, True)])
def test_top5_only_where_the_class_count_makes_it_informative(classes, shows_top5):
    torch.manual_seed(0)
    batches = [(torch.randn(8, 4), torch.randint(0, classes, (8,))) for _ in range(2)]
    result = evaluate(_Logits(classes), batches)
    assert (result.top5 is not None) is shows_top5


class _Loader(list):
    def set_epoch(self, epoch: int) -> None:
        pass


def test_progress_lines_show_images_per_second(caplog):
    torch.manual_seed(0)
    model = _Logits(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loader = _Loader((torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(4))
    with caplog.at_level(logging.INFO, logger="grafting"):
        train_one_epoch(model, loader, optimizer, scheduler, epoch=1, print_freq=2)
    progress = [r.getMessage() for r in caplog.records if "[2/4]" in r.getMessage() or "[4/4]" in r.getMessage()]
    assert len(progress) == 2 and all(re.search(r" \d+ img/s$", line) for line in progress), progress


# ----------------------------------------------------------------------------------------------
# metrics.jsonl and TensorBoard


def test_metrics_on_resume_drop_repeated_epochs_and_keep_the_elapsed_time(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    reporter = RunReporter(metrics, None)
    for epoch in (1, 2, 3):
        reporter.epoch(grafted_record(epoch=epoch, elapsed_s=100.0 * epoch))
    assert [r["epoch"] for r in read_metrics(metrics)] == [1, 2, 3]
    resumed = RunReporter(metrics, None, start_epoch=3)  # epoch 3 is repeated
    assert [r["epoch"] for r in read_metrics(metrics)] == [1, 2]
    assert resumed.elapsed_before_s == 200.0


def test_metrics_of_a_start_drop_what_a_killed_start_left_of_the_epochs_it_trains_again(tmp_path):
    """A process killed after reporting epoch 1 but before saving it, or in the middle of writing the line,
    trains epoch 1 again: the next start keeps every epoch once and what it appends readable."""
    metrics = tmp_path / "metrics.jsonl"
    for left in (grafted_record(epoch=1).to_json() + "\n", grafted_record(epoch=1).to_json()[:40]):
        metrics.write_text(left)
        reporter = RunReporter(metrics, None, start_epoch=1)
        for epoch in (1, 2):
            reporter.epoch(grafted_record(epoch=epoch))
        assert [r["epoch"] for r in read_metrics(metrics)] == [1, 2], left


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    [path] = folder.glob("events.out.tfevents.*")
    return [event for event in EventFileLoader(str(path)).Load() if event.HasField("summary")]


def test_tensorboard_shows_the_grafting_and_the_settings(tmp_path):
    from tensorboard.plugins.hparams import plugin_data_pb2

    settings = {"model": "resnet20", "a": 0.4, "num": 2, "teacher": [], "graft_rule": None, "generated_data": True}
    reporter = RunReporter(None, tmp_path / "tb", settings=settings)
    norms = torch.cat([torch.full((5,), 0.02), torch.linspace(1.0, 20.0, 100)])
    for epoch in range(1, 5):
        reporter.epoch(grafted_record(epoch=epoch, epochs=4), norms)
    reporter.close()

    tags: dict[str, list] = {}
    for event in _events(tmp_path / "tb"):
        for value in event.summary.value:
            tags.setdefault(value.tag, []).append((event.step, value))
    assert [step for step, _ in tags["alpha/all_layers"]] == [1, 2, 3, 4]  # a histogram per epoch
    assert len(tags["filters/l1_norm"]) == 4
    assert [step for step, _ in tags["filters/l1_norm_distribution"]] == picture_epochs(4) == [1, 2, 3, 4]
    assert tags["entropy/conv1.weight"][0][1].tensor.float_val[0] == pytest.approx(1.9)
    assert tags["entropy_peer/conv1.weight"][0][1].tensor.float_val[0] == pytest.approx(2.1)
    layout = tags["custom_scalars__config__"][0][1].tensor.string_val[0]
    assert b"entropy_peer/conv1" in layout and b"entropy/conv1" in layout
    text = tags["settings/text_summary"][0][1].tensor.string_val[0].decode()
    assert STAND_IN_NOTE in text and "| model | resnet20 |" in text
    start = plugin_data_pb2.HParamsPluginData.FromString(
        tags["_hparams_/session_start_info"][0][1].metadata.plugin_data.content
    ).session_start_info
    assert start.hparams["model"].string_value == "resnet20" and start.hparams["a"].number_value == 0.4
    assert start.hparams["generated_data"].string_value == "true" and start.hparams["graft_rule"].string_value == "none"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        tags["_hparams_/experiment"][0][1].metadata.plugin_data.content
    ).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {"test/acc", "test/best"}


def test_picture_epochs_are_a_few_points_of_the_run():
    assert picture_epochs(200) == [1, 50, 100, 150, 200]
    assert picture_epochs(1) == [1]


def test_filter_norm_picture_shows_invalid_filters_in_red():
    def red_pixels(picture: np.ndarray) -> int:
        return int(((picture[..., 0] > 180) & (picture[..., 1] < 80) & (picture[..., 2] < 80)).sum())

    valid = filter_norm_picture(np.linspace(1.0, 30.0, 200), "epoch 1/2")
    some_invalid = filter_norm_picture(np.concatenate([np.zeros(20), np.linspace(1.0, 30.0, 180)]), "epoch 1/2")
    assert valid.shape == some_invalid.shape and valid.shape[2] == 3 and valid.dtype == np.uint8
    assert red_pixels(valid) == 0 and red_pixels(some_invalid) > 100
