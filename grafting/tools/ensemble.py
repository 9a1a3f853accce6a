"""``graft-ensemble``: test top-1 of each of K CIFAR checkpoints and of the mean of their softmax outputs.

    graft-ensemble --model mobilenetv2 --cifar 10 --data data runs/e/m*/net1/best.pt
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from grafting.archs import cifar_models
from grafting.checkpoint import load_state_dict_file, load_weights_into
from grafting.errors import GraftingError, UsageError
from grafting.tools.published import published_accuracy
from grafting.tools.runs import read_config
from grafting.tools.table import markdown, number
from grafting.train.cli import ArgumentParser, entry_point

__all__ = ["EnsembleResult", "ensemble_accuracy", "cifar_test_loader", "parse_args", "main"]


@dataclass
class EnsembleResult:
    """Test top-1 (%) of each member and of the average of their softmax outputs."""

    members: list[float]
    ensemble: float
    images: int


def cifar_test_loader(data: str | Path, num_classes: int, batch_size: int = 100, device: str | torch.device = "cpu"):
    """The CIFAR test split, normalised, in file order, as batches on ``device``."""
    from grafting.data.cifar import TensorCifarLoader, load_cifar  # the data package is only needed here

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
    network = cifar_models.create(model, num_classes=num_classes)
    load_weights_into(network, load_state_dict_file(path), source=str(path),
                      expected=f"--model {model} with {num_classes} classes",
                      advice="pass the model and --cifar it was trained with")
    return network.to(device)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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


def _ensemble_recipe(args: argparse.Namespace) -> tuple[str, int]:
    model, cifar = args.model, args.cifar
    config_path = Path(args.checkpoints[0]).parent / "config.json"
    if (model is None or cifar is None) and config_path.exists():
        config = read_config(config_path)
        model = model or config.get("model")
        cifar = cifar or config.get("num_classes") or config.get("cifar")
    if model is None or cifar is None:
        raise UsageError(f"no config.json next to {args.checkpoints[0]}: pass --model and --cifar")
    return str(model), int(cifar)


@entry_point
def main(argv: list[str] | None = None) -> None:
    """``graft-ensemble``: print each member's and the ensemble's test top-1."""
    from grafting.train.runtime import choose_device

    args = parse_args(argv)
    model, cifar = _ensemble_recipe(args)
    device = choose_device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    networks = [_network_from_checkpoint(Path(p), model, cifar, device) for p in args.checkpoints]
    result = ensemble_accuracy(networks, cifar_test_loader(args.data, cifar, args.batch_size, device))
    rows = [[str(p), number(acc)] for p, acc in zip(args.checkpoints, result.members)]
    rows.append([f"ensemble of {len(networks)} (mean softmax)", number(result.ensemble)])
    published = published_accuracy(model, f"cifar{cifar}", f"ensemble x{len(networks)}")
    if published is not None:
        rows.append([f"paper: {model} {len(networks)} models ensemble", number(published)])
    print(markdown(["checkpoint", f"top-1 on {result.images} CIFAR-{cifar} test images"], rows))
