"""Comparing runs with the paper: invalid-filter tables, ensembles, and a summary of run folders.

Three command-line tools (console scripts, and thin wrappers in ``scripts/``):

    graft-filters  base=runs/b/net1/best.pt graft=runs/g/net1/best.pt -t 0.1,0.01 --model resnet32
    graft-ensemble --model mobilenetv2 --cifar 10 --data data runs/e/m*/net1/best.pt
    graft-summary  runs/

The published numbers of METHOD.md §8 live here as data (:data:`PUBLISHED`, :data:`PUBLISHED_TOP5`,
:data:`PUBLISHED_INVALID`), keyed by the method labels that :func:`method_label` gives a run.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from .checkpoint import load_file, load_state_dict_file, load_weights_into
from .cli import ArgumentParser, entry_point
from .errors import CheckpointError, GraftingError, UsageError
from .filters import count_invalid_filters

__all__ = [
    "PUBLISHED", "PUBLISHED_TOP5", "PUBLISHED_INVALID", "method_label", "published_accuracy",
    "FilterRow", "count_filters", "filter_table",
    "EnsembleResult", "ensemble_accuracy", "cifar_test_loader",
    "NetworkResult", "RunSummary", "find_runs", "summary_table",
    "parse_filters_args", "parse_ensemble_args", "parse_summary_args",
    "filters_main", "ensemble_main", "summary_main",
]

log = logging.getLogger(__name__)

DEFAULT_A, DEFAULT_C = 0.4, 500.0


# ----------------------------------------------------------------------------------------------
# The published numbers (METHOD.md §8) and the method labels that key them


def _two_datasets(model: str, method: str, cifar10: float, cifar100: float) -> dict[tuple[str, str, str], float]:
    return {(model, "cifar10", method): cifar10, (model, "cifar100", method): cifar100}


def _published_cifar() -> dict[tuple[str, str, str], float]:
    table: dict[tuple[str, str, str], float] = {}
    main = {  # model: (baseline, slr, dlr), each (CIFAR-10, CIFAR-100); two networks
        "resnet32": ((92.83, 69.82), (93.33, 71.16), (93.94, 71.28)),
        "resnet56": ((93.50, 71.55), (94.28, 73.09), (94.73, 72.83)),
        "resnet110": ((93.81, 73.21), (94.60, 74.70), (94.96, 75.27)),
        "mobilenetv2": ((92.42, 71.44), (93.53, 73.26), (94.20, 74.15)),
    }
    for model, rows in main.items():
        for method, (c10, c100) in zip(("baseline", "slr", "dlr"), rows):
            table.update(_two_datasets(model, method, c10, c100))
    # MobileNetV2 with more networks (dlr; two networks is the main table's dlr row).
    for num, (c10, c100) in {3: (94.55, 76.21), 4: (95.23, 77.08), 6: (95.33, 78.32), 8: (95.20, 77.76)}.items():
        table.update(_two_datasets("mobilenetv2", f"dlr x{num}", c10, c100))
    table.update(_two_datasets("mobilenetv2", "ensemble x6", 94.09, 76.75))
    # Leaky-ReLU ResNets and VGG-16: the paper does not name the schedule, so "grafting" stands for any.
    leaky = {"resnet32_leaky": ((93.28, 70.04), (93.6, 70.93)),
             "resnet56_leaky": ((94.03, 72.24), (94.32, 73.14)),
             "resnet110_leaky": ((93.24, 73.34), (93.97, 73.82))}
    for model, (baseline, grafting) in leaky.items():
        table.update(_two_datasets(model, "baseline", *baseline))
        table.update(_two_datasets(model, "grafting", *grafting))
    table.update(_two_datasets("vgg16", "baseline", 93.68, 73.41))
    table.update(_two_datasets("vgg16", "grafting", 94.02, 74.28))
    table.update(_two_datasets("vgg16", "filter grafting", 94.26, 74.63))
    # MobileNetV2, a and c (schedule not named): a = 0.4 with c swept, then c = 100 with a swept.
    for c, (c10, c100) in {1: (93.19, 73.3), 5: (92.76, 72.69), 10: (93.31, 73.26), 50: (93.24, 73.05),
                           500: (92.79, 72.38)}.items():
        table.update(_two_datasets("mobilenetv2", f"grafting a=0.4 c={c}", c10, c100))
    for a, (c10, c100) in {0: (93.4, 72.55), 0.2: (93.61, 72.9), 0.4: (93.46, 73.13), 0.6: (92.6, 72.68),
                           0.8: (93.03, 71.8), 1: (92.53, 72.27)}.items():
        table.update(_two_datasets("mobilenetv2", f"grafting a={a:g} c=100", c10, c100))
    return table


PUBLISHED: dict[tuple[str, str, str], float] = {
    **_published_cifar(),
    ("resnet18", "imagenet", "baseline"): 69.15, ("resnet18", "imagenet", "grafting"): 71.19,
    ("resnet34", "imagenet", "baseline"): 72.60, ("resnet34", "imagenet", "grafting"): 74.58,
    ("resnet50", "imagenet", "baseline"): 75.92, ("resnet50", "imagenet", "grafting"): 76.76,
}
"""Top-1 test accuracy (%) by (model, dataset, method label)."""

PUBLISHED_TOP5: dict[tuple[str, str, str], float] = {
    ("resnet18", "imagenet", "baseline"): 88.87, ("resnet18", "imagenet", "grafting"): 90.01,
    ("resnet34", "imagenet", "baseline"): 90.91, ("resnet34", "imagenet", "grafting"): 92.05,
    ("resnet50", "imagenet", "baseline"): 92.81, ("resnet50", "imagenet", "grafting"): 93.34,
}
"""ImageNet top-5 accuracy (%), keyed like :data:`PUBLISHED`."""

PUBLISHED_INVALID: dict[tuple[str, str, float], tuple[int, int]] = {
    ("resnet32", "baseline", 0.1): (36, 1136), ("resnet32", "grafting", 0.1): (14, 1136),
    ("resnet32", "baseline", 0.01): (35, 1136), ("resnet32", "grafting", 0.01): (8, 1136),
    ("mobilenetv2", "baseline", 0.1): (10929, 17088), ("mobilenetv2", "grafting", 0.1): (9903, 17088),
    ("mobilenetv2", "baseline", 0.01): (9834, 17088), ("mobilenetv2", "grafting", 0.01): (8492, 17088),
}
"""Invalid filters (invalid, total) on CIFAR-10 by (model, baseline/grafting, threshold)."""

_SCHEDULES = ("slr", "dlr", "cos")


def _schedule(config: Mapping[str, Any]) -> str:
    """slr, dlr or cos. The ImageNet script is cosine unless --steplr; the CIFAR one is stepped unless --cos."""
    if config.get("difflr"):
        return "dlr"
    cosine = config.get("cos")
    if cosine is None and "steplr" in config:
        cosine = not config["steplr"]
    return "cos" if cosine else "slr"


def method_label(config: Mapping[str, Any]) -> str:
    """A short name for how a run trained, from its config.json: the key of the published tables.

    ``baseline`` (one network); ``slr`` / ``dlr`` / ``cos`` (the schedule) for two networks, with
    ``filter`` before it for filter-level grafting and `` xN`` after it for N != 2 networks;
    ``noise``/``internal``/``average`` for the ablation sources; then `` a=.. c=..`` when they are
    not the defaults, the criterion when it is not entropy, and `` +distill <mode>`` with distillation.
    """
    num = int(config.get("num", 1))
    source = config.get("source") or "external"
    schedule = _schedule(config)
    if source in ("internal", "noise"):
        label = f"{source} {schedule}"
    elif num == 1:
        label = "baseline"
    else:
        label = f"average {schedule}" if source == "average" else schedule
        if config.get("level") == "filter":
            label = f"filter {label}"
        if num != 2:
            label += f" x{num}"
    if label != "baseline" and source == "external":
        a, c = float(config.get("a", DEFAULT_A)), float(config.get("c", DEFAULT_C))
        if (a, c) != (DEFAULT_A, DEFAULT_C):
            label += f" a={a:g} c={c:g}"
        if config.get("criterion", "entropy") != "entropy":
            label += f" {config['criterion']}"
    if config.get("distill") not in (None, False, "none"):
        label += f" +distill {config['distill']}"
    return label


def published_accuracy(model: str, dataset: str, method: str, *, top5: bool = False) -> float | None:
    """The paper's number for this row, or None. Tables that do not name the schedule are keyed
    ``grafting``: a ``slr``, ``dlr`` or ``cos`` label falls back to that."""
    table = PUBLISHED_TOP5 if top5 else PUBLISHED
    exact = table.get((model, dataset, method))
    if exact is not None:
        return exact
    words = method.split(" ")
    generic = " ".join("grafting" if word in _SCHEDULES else word for word in words)
    return table.get((model, dataset, generic))


# ----------------------------------------------------------------------------------------------
# Invalid filters


@dataclass
class FilterRow:
    """One line of the invalid-filter table: a name and (invalid, total) per threshold."""

    name: str
    counts: dict[float, tuple[int, int]]


def _split_label(text: str) -> tuple[str, Path]:
    """``label=path`` or a bare path (then the path is the label)."""
    label, sep, path = text.partition("=")
    if sep and label and "/" not in label and not Path(text).exists():
        return label, Path(path)
    return text, Path(text)


def count_filters(checkpoints: Sequence[str], thresholds: Sequence[float]) -> list[FilterRow]:
    """Invalid/total filters (METHOD.md §1: conv keys, l1 norm below t) of each checkpoint at each
    threshold. Entries are paths or ``label=path``; any layout ``extract_state_dict`` accepts."""
    rows = []
    for entry in checkpoints:
        label, path = _split_label(entry)
        state = load_state_dict_file(path)
        counts = {t: count_invalid_filters(state, t) for t in thresholds}
        if all(total == 0 for _, total in counts.values()):
            raise CheckpointError(f"{path} has no convolution weights whose key contains 'conv'; "
                                  "is it a checkpoint of a CNN from this project or the paper?")
        rows.append(FilterRow(label, counts))
    return rows


def _markdown(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def filter_table(rows: Sequence[FilterRow], thresholds: Sequence[float], model: str | None = None) -> str:
    """The paper's table as markdown: a row per checkpoint, a column per threshold, cells
    ``invalid/total``; with ``model``, the paper's baseline and grafting rows follow ('-' if unknown)."""
    header = ["checkpoint"] + [f"t = {t:g}" for t in thresholds]
    body = [[row.name] + [f"{row.counts[t][0]}/{row.counts[t][1]}" for t in thresholds] for row in rows]
    if model is not None:
        for method in ("baseline", "grafting"):
            cells = []
            for t in thresholds:
                published = PUBLISHED_INVALID.get((model, method, float(t)))
                cells.append(f"{published[0]}/{published[1]}" if published else "-")
            body.append([f"paper: {model} {method}"] + cells)
    return _markdown(header, body)


# ----------------------------------------------------------------------------------------------
# Ensembles


@dataclass
class EnsembleResult:
    """Test top-1 (%) of each member and of the average of their softmax outputs."""

    members: list[float]
    ensemble: float
    images: int


def cifar_test_loader(data: str | Path, num_classes: int, batch_size: int = 100, device: str | torch.device = "cpu"):
    """The CIFAR test split, normalised, in file order, as batches on ``device``."""
    from .data.cifar import TensorCifarLoader, load_cifar  # the data package is only needed here

    _, test_set = load_cifar(data, num_classes)
    images = torch.as_tensor(test_set.data).permute(0, 3, 1, 2).contiguous().to(device)
    labels = torch.as_tensor(test_set.targets, dtype=torch.long)
    loader = TensorCifarLoader(images, labels, batch_size, train=False)
    loader.set_epoch(0)
    return loader


@torch.no_grad()
def ensemble_accuracy(networks: Sequence[torch.nn.Module], loader: Iterable) -> EnsembleResult:
    """Top-1 of each network and of their mean softmax on ``loader``'s ``(images, labels)`` batches."""
    if not networks:
        raise UsageError("an ensemble needs at least one checkpoint")
    for network in networks:
        network.eval()
    member_hits = torch.zeros(len(networks), dtype=torch.long)
    ensemble_hits, seen = 0, 0
    for images, labels in loader:
        probabilities = torch.stack([network(images).float().softmax(dim=1) for network in networks])
        labels = labels.to(probabilities.device)
        member_hits += (probabilities.argmax(dim=2) == labels).sum(dim=1).cpu()
        ensemble_hits += int((probabilities.mean(dim=0).argmax(dim=1) == labels).sum())
        seen += labels.numel()
    if seen == 0:
        raise GraftingError("the test set is empty; check --data")
    return EnsembleResult(members=(100.0 * member_hits.double() / seen).tolist(),
                          ensemble=100.0 * ensemble_hits / seen, images=seen)


def _network_from_checkpoint(path: Path, model: str, num_classes: int, device: torch.device) -> torch.nn.Module:
    import models  # the registry of CIFAR architectures

    network = models.create(model, num_classes=num_classes)
    load_weights_into(network, load_state_dict_file(path), source=str(path),
                      expected=f"--model {model} with {num_classes} classes",
                      advice="pass the model and --cifar it was trained with")
    return network.to(device)


# ----------------------------------------------------------------------------------------------
# Run folders


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


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is unreadable ({err}); fix or delete it") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not hold a settings object; fix or delete it")
    return config


def _network_result(folder: Path, net: int, epochs: int | None) -> NetworkResult:
    best = final = epoch = None
    if (folder / "best.pt").exists():
        best_state = load_file(folder / "best.pt", weights_only=True)
        if isinstance(best_state, dict) and best_state.get("acc") is not None:
            best = float(best_state["acc"])
    if (folder / "last.pt").exists():
        last = load_file(folder / "last.pt", weights_only=True)
        if isinstance(last, dict):
            epoch = int(last["epoch"]) if last.get("epoch") is not None else None
            # The final accuracy is the last epoch's, and only once the run is over.
            if last.get("acc") is not None and epoch is not None and epoch == epochs:
                final = float(last["acc"])
    return NetworkResult(net, best, final, epoch)


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
        folders.update(config.parent.parent for config in root.rglob("net*/config.json")
                       if re.fullmatch(r"net\d+", config.parent.name))
    runs = []
    for folder in folders:
        nets = sorted(int(p.name[3:]) for p in folder.glob("net*") if re.fullmatch(r"net\d+", p.name)
                      and (p / "config.json").exists())
        config = _read_config(folder / f"net{nets[0]}" / "config.json")
        epochs = int(config["epochs"]) if config.get("epochs") is not None else None
        run = RunSummary(folder=folder, model=str(config.get("model") or config.get("arch") or "?"),
                         dataset=_dataset_name(config), method=method_label(config), epochs=epochs)
        run.networks = [_network_result(folder / f"net{net}", net, epochs) for net in nets]
        runs.append(run)
    return sorted(runs, key=lambda r: (r.model, r.dataset, r.method, str(r.folder)))


def _number(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def summary_table(runs: Sequence[RunSummary], base: str | Path | None = None) -> str:
    """Markdown: a row per run with each network's best and final top-1, their means, the paper's
    number and mean best minus it. Folders are shown relative to ``base`` when given."""
    header = ["run", "model", "dataset", "method", "epochs", "best", "final", "mean best", "mean final",
              "paper", "diff"]
    body = []
    for run in runs:
        done = [n.epoch or 0 for n in run.networks]
        progress = f"{min(done)}/{run.epochs if run.epochs is not None else '?'}"
        name = str(run.folder)
        if base is not None:
            try:
                name = str(run.folder.resolve().relative_to(Path(base).resolve())) or "."
            except ValueError:
                pass
        mean_best, published = run.mean_best, run.published
        diff = f"{mean_best - published:+.2f}" if mean_best is not None and published is not None else "-"
        body.append([name, run.model, run.dataset, run.method, progress,
                     " / ".join(_number(n.best) for n in run.networks),
                     " / ".join(_number(n.final) for n in run.networks),
                     _number(mean_best), _number(run.mean_final), _number(published), diff])
    return _markdown(header, body)


# ----------------------------------------------------------------------------------------------
# Command lines


def _thresholds(text: str) -> list[float]:
    """A comma list of positive numbers: '0.1,0.01'."""
    values = []
    for word in text.split(","):
        try:
            value = float(word)
        except ValueError:
            raise argparse.ArgumentTypeError(f"threshold '{word}' is not a number; write e.g. 0.1,0.01") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"threshold {word} must be positive")
        values.append(value)
    return values


def parse_filters_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags of ``graft-filters``."""
    parser = ArgumentParser(prog="graft-filters", description="Invalid filters (l1 norm < t) per checkpoint and threshold.")
    parser.add_argument("checkpoints", nargs="+", metavar="[LABEL=]CHECKPOINT",
                        help="checkpoint files (.pt/.pth/.t7, any common layout), optionally named LABEL=PATH")
    parser.add_argument("-t", "--thresholds", type=_thresholds, default=[0.1, 0.01], metavar="T1,T2",
                        help="l1-norm thresholds, comma-separated (default: 0.1,0.01, the paper's)")
    parser.add_argument("--model", default=None, help="add the paper's rows for this model (resnet32, mobilenetv2)")
    return parser.parse_args(argv)


def parse_ensemble_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags of ``graft-ensemble``; the model and dataset default to the first checkpoint's config.json."""
    parser = ArgumentParser(prog="graft-ensemble", description="Test accuracy of the softmax average of K checkpoints.")
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="checkpoint files of one architecture")
    parser.add_argument("--model", default=None, help="architecture (default: from <checkpoint folder>/config.json)")
    parser.add_argument("--cifar", type=int, choices=(10, 100), default=None,
                        help="CIFAR-10 or CIFAR-100 (default: from <checkpoint folder>/config.json)")
    parser.add_argument("--data", default="data", help="folder holding cifar-10-batches-py/ or cifar-100-python/")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    return args


def parse_summary_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags of ``graft-summary``."""
    parser = ArgumentParser(prog="graft-summary", description="Markdown table of run folders next to the paper's numbers.")
    parser.add_argument("folders", nargs="+", metavar="FOLDER", help="experiment output folders or run folders (--s)")
    return parser.parse_args(argv)


@entry_point
def filters_main(argv: list[str] | None = None) -> None:
    """``graft-filters``: print the invalid-filter table."""
    args = parse_filters_args(argv)
    print(filter_table(count_filters(args.checkpoints, args.thresholds), args.thresholds, args.model))


def _ensemble_recipe(args: argparse.Namespace) -> tuple[str, int]:
    model, cifar = args.model, args.cifar
    config_path = Path(args.checkpoints[0]).parent / "config.json"
    if (model is None or cifar is None) and config_path.exists():
        config = _read_config(config_path)
        model = model or config.get("model")
        cifar = cifar or config.get("num_classes") or config.get("cifar")
    if model is None or cifar is None:
        raise UsageError(f"no config.json next to {args.checkpoints[0]}: pass --model and --cifar")
    return str(model), int(cifar)


@entry_point
def ensemble_main(argv: list[str] | None = None) -> None:
    """``graft-ensemble``: print each member's and the ensemble's test top-1."""
    from .runtime import choose_device

    args = parse_ensemble_args(argv)
    model, cifar = _ensemble_recipe(args)
    device = choose_device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    networks = [_network_from_checkpoint(Path(p), model, cifar, device) for p in args.checkpoints]
    result = ensemble_accuracy(networks, cifar_test_loader(args.data, cifar, args.batch_size, device))
    rows = [[str(p), _number(acc)] for p, acc in zip(args.checkpoints, result.members)]
    rows.append([f"ensemble of {len(networks)} (mean softmax)", _number(result.ensemble)])
    published = published_accuracy(model, f"cifar{cifar}", f"ensemble x{len(networks)}")
    if published is not None:
        rows.append([f"paper: {model} {len(networks)} models ensemble", _number(published)])
    print(_markdown(["checkpoint", f"top-1 on {result.images} CIFAR-{cifar} test images"], rows))


@entry_point
def summary_main(argv: list[str] | None = None) -> None:
    """``graft-summary``: print the results table of every run under the given folders."""
    args = parse_summary_args(argv)
    runs = find_runs(args.folders)
    if not runs:
        raise UsageError(f"no runs (net<i>/config.json) under {', '.join(args.folders)}")
    base = args.folders[0] if len(args.folders) == 1 else None
    print(summary_table(runs, base))
    print("\nbest: highest test top-1 of any epoch; final: after the last epoch; diff: mean best - paper.")
