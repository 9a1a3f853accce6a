"""Finding run folders (the shared folders ``--s`` of finished or running rings) and reading each
network's results from its ``config.json`` and ``metrics.jsonl``.

Every value read from these files is checked, so a file edited by hand gives a one-line
:class:`CheckpointError` that names the file and the field, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grafting.checkpoint import read_json_file
from grafting.errors import CheckpointError, UsageError, first_line
from grafting.ring.exchange import heartbeat_age, stale_after_s
from grafting.ring.layout import CONFIG_NAME, NETWORK_FOLDER, NetworkFiles, SharedFolder
from grafting.tools.published import PUBLISHED_EPOCHS, method_label, published_accuracy
from grafting.train.report import read_metrics

__all__ = [
    "NetworkResult",
    "RunSummary",
    "find_runs",
    "add_folders_argument",
    "read_config",
    "read_run",
    "network_metrics",
    "dataset_name",
    "mean_std",
    "run_label",
    "STAND_IN",
    "STAND_IN_SUFFIX",
]

# How tables and figures name a run, checkpoint or dataset trained on generated data.
STAND_IN = "generated stand-in"
STAND_IN_SUFFIX = f" ({STAND_IN})"

# The types of the config.json fields the tools read (a field may be missing: older runs, other scripts).
_WHOLE, _NUMBER, _TEXT, _SWITCH = "a whole number", "a number", "text", "true or false"
_CONFIG_FIELDS = {
    "model": _TEXT,
    "arch": _TEXT,
    "dataset": _TEXT,
    "data": _TEXT,
    "num": _WHOLE,
    "i": _WHOLE,
    "epochs": _WHOLE,
    "num_classes": _WHOLE,
    "cifar": _WHOLE,
    "a": _NUMBER,
    "c": _NUMBER,
    "level": _TEXT,
    "filter_bn_blend": _TEXT,
    "criterion": _TEXT,
    "source": _TEXT,
    "distill": _TEXT,
    "difflr": _SWITCH,
    "cos": _SWITCH,
    "steplr": _SWITCH,
    "generated_data": _SWITCH,
    "stand_in": _TEXT,
    "image_size": _WHOLE,
}
# The metrics.jsonl fields the tools read.
_METRIC_FIELDS = {
    "epoch": _WHOLE,
    "epochs": _WHOLE,
    "test_acc": _NUMBER,
    "test_acc5": _NUMBER,
    "invalid_filters": "a mapping",
    "total_filters": _WHOLE,
}


def _fits(value: Any, kind: str) -> bool:
    if value is None:
        return True
    if kind == _WHOLE:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _NUMBER:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == _TEXT:
        return isinstance(value, str)
    if kind == _SWITCH:
        return isinstance(value, bool)
    return isinstance(value, dict)


def _check_fields(values: Mapping[str, Any], kinds: Mapping[str, str], where: str, advice: str) -> None:
    for name, kind in kinds.items():
        if not _fits(values.get(name), kind):
            raise CheckpointError(f"{where}: '{name}' is {values[name]!r}, not {kind}; {advice}")


def read_config(path: Path) -> dict[str, Any]:
    """A run's ``config.json`` as a dict, its fields checked (one-line :class:`CheckpointError` when it
    is unreadable or a field has the wrong type, e.g. after a hand edit)."""
    try:
        config = read_json_file(path)
    except (OSError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else first_line(err)
        raise CheckpointError(f"{path} is unreadable ({reason}); fix or delete it") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not hold a settings object; fix or delete it")
    _check_fields(config, _CONFIG_FIELDS, str(path), "fix it (the training script writes it) or delete the run")
    return config


def network_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a network's ``metrics.jsonl`` ([] when there is none), their fields checked; a
    last line cut off by a crash is ignored."""
    try:
        records = read_metrics(path)
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read {path} ({err}); fix or delete it") from None
    for number, record in enumerate(records, start=1):
        _check_fields(record, _METRIC_FIELDS, f"{path}, line {number}", "fix or delete that line")
        if not isinstance(record.get("epoch"), int) or not isinstance(record.get("test_acc"), (int, float)):
            raise CheckpointError(f"{path}, line {number}: no 'epoch' or 'test_acc'; fix or delete that line")
    return records


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for one value); (None, None) unless every value is known."""
    if not values or any(v is None for v in values):
        return None, None
    known = [float(v) for v in values]  # type: ignore[arg-type]
    return statistics.fmean(known), statistics.stdev(known) if len(known) > 1 else None


@dataclass
class NetworkResult:
    """One network of a run: test top-1 (and top-5) at its best epoch and after its last, the last
    finished epoch, and whether its process is alive (a fresh heartbeat)."""

    net: int
    epoch: int | None = None
    best: float | None = None
    final: float | None = None
    best_top5: float | None = None
    final_top5: float | None = None
    alive: bool = False


@dataclass
class RunSummary:
    """A run folder (the shared folder ``--s``): its recipe and each network's results."""

    folder: Path
    model: str
    dataset: str
    method: str
    epochs: int | None
    num: int = 1
    generated_data: bool = False
    stand_in: str = ""
    networks: list[NetworkResult] = field(default_factory=list)

    @property
    def experiment(self) -> tuple[str, str, bool, str]:
        """What runs must share to be compared: model, dataset, whether the data was a generated stand-in and
        which one (its description: two different stand-ins are two datasets)."""
        return self.model, self.dataset, self.generated_data, self.stand_in

    @property
    def dataset_label(self) -> str:
        """The dataset as tables and figures name it: ``cifar10``, ``cifar10 (generated stand-in: ...)``."""
        if not self.generated_data:
            return self.dataset
        if not self.stand_in:
            return self.dataset + STAND_IN_SUFFIX
        return f"{self.dataset} ({STAND_IN}: {self.stand_in})"

    @property
    def finished(self) -> bool:
        """Every network has trained all its epochs: the one definition of ``done``."""
        return self.epochs is not None and all(n.epoch is not None and n.epoch >= self.epochs for n in self.networks)

    @property
    def paper_epochs(self) -> int | None:
        """The epochs of the paper's recipe for this dataset (None: the paper has no such table)."""
        return PUBLISHED_EPOCHS.get(self.dataset)

    @property
    def status(self) -> str:
        """``done`` (every network trained all its epochs, however many); ``running e/E`` (every unfinished
        network is alive); ``failed e/E`` (a network stopped before its last epoch)."""
        if self.finished:
            return "done"
        done = min((n.epoch or 0) for n in self.networks) if self.networks else 0
        unfinished = [n for n in self.networks if n.epoch is None or self.epochs is None or n.epoch < self.epochs]
        word = "running" if all(n.alive for n in unfinished) else "failed"
        return f"{word} {done}/{self.epochs if self.epochs is not None else '?'}"

    @property
    def comparable(self) -> bool:
        """Whether the paper's number applies: done, with the paper's epochs, on the real dataset."""
        paper = self.paper_epochs
        return self.finished and not self.generated_data and paper is not None and self.epochs == paper

    def stats(self, what: str) -> tuple[float | None, float | None]:
        """Mean and standard deviation over the networks of ``best``, ``final``, ``best_top5`` or ``final_top5``."""
        return mean_std([getattr(n, what) for n in self.networks])

    @property
    def mean_best(self) -> float | None:
        """Mean over the networks of their best top-1 (None unless every network has one)."""
        return self.stats("best")[0]

    @property
    def mean_final(self) -> float | None:
        """Mean over the networks of their final top-1 (None unless every network finished)."""
        return self.stats("final")[0]

    @property
    def published(self) -> float | None:
        """The paper's top-1 for this model, dataset and method (None for a generated stand-in)."""
        return None if self.generated_data else published_accuracy(self.model, self.dataset, self.method)

    @property
    def published_top5(self) -> float | None:
        """The paper's top-5 (ImageNet), as :attr:`published`."""
        return None if self.generated_data else published_accuracy(self.model, self.dataset, self.method, top5=True)


def dataset_name(config: Mapping[str, Any]) -> str:
    """``cifar10``/``cifar100``, ``imagenet`` (an ImageFolder of 1000 classes), else ``imagefolder (N classes)``."""
    if config.get("dataset") == "imagefolder" or config.get("arch"):
        classes = config.get("num_classes")
        return "imagenet" if classes in (None, 1000) else f"imagefolder ({classes} classes)"
    if config.get("dataset"):
        return str(config["dataset"])
    if config.get("cifar"):
        return f"cifar{config['cifar']}"
    return "?"


def _network_result(files: NetworkFiles, epochs: int | None, stale_after: float) -> NetworkResult:
    age = heartbeat_age(SharedFolder(files.root).alive(files.net))
    result = NetworkResult(files.net, alive=age is not None and age < stale_after)
    records = network_metrics(files.metrics)
    if not records:
        return result
    best = max(records, key=lambda r: r["test_acc"])  # the first of equal bests, as best.pt
    last = records[-1]
    result.epoch, result.best, result.best_top5 = last["epoch"], best["test_acc"], best.get("test_acc5")
    if epochs is not None and last["epoch"] >= epochs:  # the final accuracy exists once the run is over
        result.final, result.final_top5 = last["test_acc"], last.get("test_acc5")
    return result


def read_run(folder: Path) -> RunSummary:
    """The recipe (from the first network's config.json) and every network's results of one run folder."""
    nets = sorted(
        int(match.group(1))
        for p in folder.iterdir()
        if (match := NETWORK_FOLDER.fullmatch(p.name)) and (p / CONFIG_NAME).exists()
    )
    if not nets:
        raise UsageError(f"{folder} holds no net<i>/{CONFIG_NAME}; pass a run folder (--s) or a folder above runs")
    every = [read_config(NetworkFiles(folder, net).config) for net in nets]
    config = every[0]
    num = config.get("num") or len(nets)
    if not 1 <= num <= 10_000:
        raise CheckpointError(f"{NetworkFiles(folder, nets[0]).config}: 'num' is {num}, not a ring size; fix it")
    run = RunSummary(
        folder=folder,
        model=str(config.get("model") or config.get("arch") or "?"),
        dataset=dataset_name(config),
        method=method_label(config),
        epochs=config.get("epochs"),
        num=num,
        # Any network on a generated stand-in marks the whole run (a ring may mix them where nothing is exchanged).
        generated_data=any(settings.get("generated_data") for settings in every),
        stand_in=next((str(settings["stand_in"]) for settings in every if settings.get("stand_in")), ""),
    )
    stale_after = stale_after_s()
    # Networks that have not written their config.json yet (not started) count too: the ring needs them.
    run.networks = [
        _network_result(NetworkFiles(folder, net), run.epochs, stale_after)
        for net in sorted(set(nets) | set(range(1, num + 1)))
    ]
    return run


def run_label(run: RunSummary, base: str | Path | None) -> str:
    """How tables and figures name a run: its folder relative to ``base`` (as reached, symbolic links kept);
    a run folder that is ``base`` itself by its own name; the whole path without a ``base``."""
    if base is None:
        return str(run.folder)
    try:
        relative = Path(os.path.abspath(run.folder)).relative_to(os.path.abspath(base))
    except ValueError:
        return str(run.folder)
    return str(relative) if str(relative) != "." else Path(os.path.abspath(run.folder)).name


def add_folders_argument(parser: argparse.ArgumentParser, verb: str) -> None:
    """The positional FOLDER... of a tool that reads the runs :func:`find_runs` finds (``verb``: what it does
    with each run, for the help)."""
    parser.add_argument(
        "folders",
        nargs="+",
        metavar="FOLDER",
        help=f"experiment output folders or run folders (--s); every run below them is {verb}",
    )


def _run_folders(root: Path) -> list[Path]:
    """The run folders at or below ``root``, following symbolic links (a run folder linked into an experiment
    folder is one of its runs) and listing each folder once, by the first path that reaches it (real folders
    before links)."""
    found, seen = [], set()
    for top, subfolders, _ in os.walk(root, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # reached again through a link (or a link loop): already walked
            subfolders.clear()
            continue
        seen.add(real)
        subfolders.sort(key=lambda name: (os.path.islink(os.path.join(top, name)), name))
        if any(
            NETWORK_FOLDER.fullmatch(name) and os.path.isfile(os.path.join(top, name, CONFIG_NAME))
            for name in subfolders
        ):
            found.append(Path(top))
    return found


def find_runs(roots: Sequence[str | Path]) -> list[RunSummary]:
    """Every run under ``roots``: a folder with ``net<i>/config.json`` files, also where a symbolic link leads;
    sorted by model, dataset, method and folder. A root may itself be a run folder."""
    folders: dict[str, Path] = {}
    for root in map(Path, roots):
        if not root.is_dir():
            raise UsageError(f"{root} is not a folder; pass the output folder of an experiment script or of --s")
        for folder in _run_folders(root):
            folders.setdefault(os.path.realpath(folder), folder)
    runs = [read_run(folder) for folder in folders.values()]
    return sorted(runs, key=lambda r: (r.model, r.dataset, r.method, str(r.folder)))
