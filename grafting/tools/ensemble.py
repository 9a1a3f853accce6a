"""``graft-ensemble``: test top-1 of each of K CIFAR checkpoints and of the mean of their softmax outputs.

graft-ensemble runs/e/m*/net1/best.pt                  # model, dataset and data folder from config.json
graft-ensemble --model mobilenetv2 --cifar 10 --data data runs/e/m*/net1/best.pt
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from grafting.archs import cifar_models
from grafting.checkpoint import load_weights_into
from grafting.data.fake import MARKER_NAME, is_generated_stand_in
from grafting.errors import CheckpointError, DatasetNotFoundError, GraftingError, UsageError
from grafting.ring.layout import CONFIG_NAME
from grafting.tools.checkpoints import load_trained_weights, run_settings, stand_in_label
from grafting.tools.published import published_accuracy
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

    try:
        _, test_set = load_cifar(data, num_classes)
    except DatasetNotFoundError:
        # load_cifar's own advice names the training scripts' --download, which this tool does not have.
        raise DatasetNotFoundError(
            f"no readable CIFAR-{num_classes} in {data}; pass --data with the folder that "
            f"holds it, or fetch it there with: graft-data download {data} --cifar "
            f"{num_classes}"
        ) from None
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
    return EnsembleResult(
        members=(100.0 * member_hits.double() / seen).tolist(), ensemble=100.0 * ensemble_hits / seen, images=seen
    )


def _network_from_checkpoint(path: Path, model: str, num_classes: int, device: torch.device) -> torch.nn.Module:
    network = cifar_models.create(model, num_classes=num_classes)
    load_weights_into(
        network,
        load_trained_weights(path),
        source=str(path),
        expected=f"--model {model} with {num_classes} classes",
        advice="pass the model and --cifar it was trained with",
    )
    return network.to(device)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags of ``graft-ensemble``; the model and dataset default to the first checkpoint's config.json."""
    parser = ArgumentParser(prog="graft-ensemble", description="Test accuracy of the softmax average of K checkpoints.")
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="checkpoint files of one architecture")
    parser.add_argument(
        "--model", default=None, help="architecture (default: from the config.json next to the first checkpoint)"
    )
    parser.add_argument(
        "--cifar",
        type=int,
        choices=(10, 100),
        default=None,
        help="CIFAR-10 or CIFAR-100 (default: from the config.json next to the first checkpoint)",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="folder holding cifar-10-batches-py/ or cifar-100-python/ (default: the run's data "
        "folder from the config.json next to the first checkpoint, else ./data)",
    )
    parser.add_argument("--batch-size", type=int, default=100, help="test batch size (default: 100)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    return args


def _ensemble_recipe(args: argparse.Namespace) -> tuple[str, int, str]:
    """Model, class count and data folder: the flags, else the config.json next to the first checkpoint."""
    model, cifar, data = args.model, args.cifar, args.data
    settings = run_settings(args.checkpoints[0]) or {}
    where = Path(args.checkpoints[0]).parent / CONFIG_NAME
    if model is None and settings.get("model") is not None:
        model = settings["model"]
        if model not in cifar_models.available():
            raise CheckpointError(
                f"{where} records model '{model}', which is not a CIFAR model of this project; pass --model"
            )
    if cifar is None:
        cifar = settings.get("num_classes") or settings.get("cifar")
        if cifar is not None and cifar not in (10, 100):
            raise CheckpointError(
                f"{where} records {cifar} classes; graft-ensemble evaluates CIFAR-10 or CIFAR-100 "
                f"checkpoints: pass --cifar"
            )
    if model is None or cifar is None:
        raise UsageError(f"no config.json next to {args.checkpoints[0]}: pass --model and --cifar")
    if data is None:
        data = settings.get("data") or "data"
        if settings.get("data") and not Path(data).is_dir():
            raise UsageError(
                f"the data folder {data} that {where} records does not exist from here (a relative "
                f"path counts from where the run was started); pass --data"
            )
    return str(model), int(cifar), str(data)


@entry_point
def main(argv: list[str] | None = None) -> None:
    """``graft-ensemble``: print each member's and the ensemble's test top-1."""
    from grafting.train.runtime import choose_device

    args = parse_args(argv)
    model, cifar, data = _ensemble_recipe(args)
    device = choose_device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    networks = [_network_from_checkpoint(Path(p), model, cifar, device) for p in args.checkpoints]
    result = ensemble_accuracy(networks, cifar_test_loader(data, cifar, args.batch_size, device))
    rows = [[str(p) + stand_in_label(run_settings(p)), number(acc)] for p, acc in zip(args.checkpoints, result.members)]
    rows.append([f"ensemble of {len(networks)} (mean softmax)", number(result.ensemble)])
    stand_in = is_generated_stand_in(data)
    published = published_accuracy(model, f"cifar{cifar}", f"ensemble x{len(networks)}")
    if published is not None and not stand_in:
        rows.append([f"paper: {model} {len(networks)} models ensemble", number(published)])
    test_set = f"GENERATED stand-in test images in {data}" if stand_in else f"CIFAR-{cifar} test images"
    print(markdown(["checkpoint", f"top-1 on {result.images} {test_set}"], rows))
    if stand_in:
        print(
            f"\ngenerated stand-in: {data} holds {MARKER_NAME}; it is not CIFAR-{cifar}, and these accuracies are "
            f"not compared with the paper"
        )
