"""torchvision classification models for the ImageNet script: any architecture by name, with the
folder's class count, and pretrained weights taken only from the local torch hub cache (never downloaded)."""

from __future__ import annotations

import logging
import os
import urllib.parse
from pathlib import Path

import torch
import torchvision
from torch import nn

from grafting.errors import CheckpointError, UsageError, first_line

__all__ = ["ARCHS", "create_model", "pretrained_weights", "model_classes"]

log = logging.getLogger(__name__)

ARCHS = sorted(torchvision.models.list_models(module=torchvision.models))
# Their auxiliary heads make the model return a tuple while training; the loop trains the main output only.
AUX_HEAD_ARCHS = ("googlenet", "inception_v3")


def pretrained_weights(arch: str) -> tuple[torchvision.models.WeightsEnum, Path]:
    """torchvision's default weights of ``arch`` and the torch hub cache file they must already be in."""
    try:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError, AttributeError):
        raise UsageError(f"--pretrained: torchvision has no pretrained weights for '{arch}'") from None
    filename = os.path.basename(urllib.parse.urlparse(weights.url).path)
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not path.is_file():
        raise UsageError(
            f"--pretrained: {arch} weights are not in the torch cache (expected {path}); this script "
            f"never downloads: fetch them with `curl -L --create-dirs -o {path} {weights.url}`"
        )
    return weights, path


def _replace_classifier(model: nn.Module, old_classes: int, new_classes: int) -> str:
    """Swap the last layer that outputs ``old_classes`` for a fresh one with ``new_classes``; return its name."""
    found = None
    for name, module in model.named_modules():
        if (isinstance(module, nn.Linear) and module.out_features == old_classes) or (
            isinstance(module, nn.Conv2d) and module.out_channels == old_classes
        ):
            found = name, module
    if found is None:
        raise UsageError(
            f"--pretrained: cannot find the {old_classes}-class output layer to resize to "
            f"{new_classes} classes; use as many class folders or train without --pretrained"
        )
    name, layer = found
    if isinstance(layer, nn.Linear):
        fresh: nn.Module = nn.Linear(layer.in_features, new_classes, bias=layer.bias is not None)
    else:
        fresh = nn.Conv2d(
            layer.in_channels,
            new_classes,
            layer.kernel_size,  # type: ignore[arg-type]  # a Conv2d's own tuples are pairs
            layer.stride,  # type: ignore[arg-type]
            layer.padding,  # type: ignore[arg-type]
            bias=layer.bias is not None,
        )
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, fresh)
    return name


def create_model(arch: str, num_classes: int, pretrained: bool = False) -> nn.Module:
    """torchvision's ``arch`` with ``num_classes`` outputs; with ``pretrained`` its cached default weights,
    the final layer replaced (and logged) when the class count differs from theirs."""
    extra = {"aux_logits": False} if arch in AUX_HEAD_ARCHS else {}
    if not pretrained:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **extra)
    weights, path = pretrained_weights(arch)
    try:
        model = torchvision.models.get_model(arch, weights=weights, **extra)
    except RuntimeError as err:  # a truncated file or a hash that does not match its name
        raise CheckpointError(f"{path} is damaged ({first_line(err)}); delete it and fetch it again") from None
    classes = len(weights.meta["categories"])
    if classes != num_classes:
        name = _replace_classifier(model, classes, num_classes)
        log.info(
            f"--pretrained: replaced {arch}'s {classes}-class layer '{name}' by a fresh "
            f"{num_classes}-class one (the folder has {num_classes} classes)"
        )
    return model


def model_classes(model: nn.Module) -> int:
    """The number of outputs of the model's last Linear/Conv layer (for messages)."""
    last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    return last.out_features if isinstance(last, nn.Linear) else last.out_channels
