"""Finding run folders (the shared folders ``--s`` of finished or running rings) and reading each
network's results from its files."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from grafting.checkpoint import load_file
from grafting.errors import CheckpointError, UsageError
from grafting.ring.layout import CONFIG_NAME, NETWORK_FOLDER, NetworkFiles
from grafting.tools.published import method_label, published_accuracy

__all__ = ["NetworkResult", "RunSummary", "find_runs", "read_config"]


@dataclass
class NetworkResult:
    """One network of a run: best and final test top-1 (%) and the last finished epoch."""

    net: int
    best: float | None
    final: float | None
    epoch: int | None


@dataclass
class RunSummary:
    """A run folder (the shared folder ``--s``): its recipe and each network's results."""

    folder: Path
    model: str
    dataset: str
    method: str
    epochs: int | None
    networks: list[NetworkResult] = field(default_factory=list)

    @staticmethod
    def _mean(values: Sequence[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return sum(known) / len(known) if known and len(known) == len(values) else None

    @property
    def mean_best(self) -> float | None:
        """Mean over the networks of their best accuracy (None unless every network has one)."""
        return self._mean([n.best for n in self.networks])

    @property
    def mean_final(self) -> float | None:
        """Mean over the networks of their final accuracy (None unless every network finished)."""
        return self._mean([n.final for n in self.networks])

    @property
    def published(self) -> float | None:
        """The paper's top-1 for this model, dataset and method, if it published one."""
        return published_accuracy(self.model, self.dataset, self.method)


def read_config(path: Path) -> dict[str, Any]:
    """A run's ``config.json`` as a dict (one-line :class:`CheckpointError` when it is unreadable)."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is unreadable ({err}); fix or delete it") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not hold a settings object; fix or delete it")
    return config


def _network_result(files: NetworkFiles, epochs: int | None) -> NetworkResult:
    best = final = epoch = None
    if files.best.exists():
        best_state = load_file(files.best, weights_only=True)
        if isinstance(best_state, dict) and best_state.get("acc") is not None:
            best = float(best_state["acc"])
    if files.last.exists():
        last = load_file(files.last, weights_only=True)
        if isinstance(last, dict):
            epoch = int(last["epoch"]) if last.get("epoch") is not None else None
            # The final accuracy is the last epoch's, and only once the run is over.
            if last.get("acc") is not None and epoch is not None and epoch == epochs:
                final = float(last["acc"])
    return NetworkResult(files.net, best, final, epoch)


def _dataset_name(config: Mapping[str, Any]) -> str:
    if config.get("dataset") == "imagefolder" and config.get("num_classes") == 1000:
        return "imagenet"  # the ImageNet script trains any class-folder dataset; 1000 classes is ImageNet
    if config.get("dataset"):
        return str(config["dataset"])
    if config.get("cifar"):
        return f"cifar{config['cifar']}"
    return "imagenet" if config.get("arch") else "?"


def find_runs(roots: Sequence[str | Path]) -> list[RunSummary]:
    """Every run under ``roots``: a folder with ``net<i>/config.json`` files; sorted by model,
    dataset, method and folder. A root may itself be a run folder."""
    folders: set[Path] = set()
    for root in map(Path, roots):
        if not root.is_dir():
            raise UsageError(f"{root} is not a folder; pass the output folder of an experiment script or of --s")
        folders.update(config.parent.parent for config in root.rglob(f"net*/{CONFIG_NAME}")
                       if NETWORK_FOLDER.fullmatch(config.parent.name))
    runs = []
    for folder in folders:
        nets = sorted(int(match.group(1)) for p in folder.iterdir()
                      if (match := NETWORK_FOLDER.fullmatch(p.name)) and (p / CONFIG_NAME).exists())
        config = read_config(NetworkFiles(folder, nets[0]).config)
        epochs = int(config["epochs"]) if config.get("epochs") is not None else None
        run = RunSummary(folder=folder, model=str(config.get("model") or config.get("arch") or "?"),
                         dataset=_dataset_name(config), method=method_label(config), epochs=epochs)
        run.networks = [_network_result(NetworkFiles(folder, net), epochs) for net in nets]
        runs.append(run)
    return sorted(runs, key=lambda r: (r.model, r.dataset, r.method, str(r.folder)))
