"""VGG with batch normalisation for 32x32 CIFAR images (Simonyan & Zisserman 2015, configs A/B/D/E).

Five 2x2 max-pools bring 32x32 down to 1x1, so a single linear layer on the 512 channels
replaces the ImageNet classifier. Each convolution sits in a ``ConvBNReLU`` module with
attributes ``conv`` and ``bn`` so that state_dict keys read ``features.0.conv.weight``:
the paper's rules find convolutions by the substring ``conv`` in the key. The
convolutions have no bias because the BatchNorm after them makes it redundant, which
also keeps ``conv`` keys equal to the set of convolution weights.
"""

from collections.abc import Sequence
from typing import Union

import torch
import torch.nn as nn

from . import register

# Output channels of each 3x3 conv; "M" is a 2x2 max-pool.
CONFIGS: dict[str, list[Union[int, str]]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class ConvBNReLU(nn.Module):
    """3x3 convolution (padding 1, no bias), BatchNorm and ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class CifarVGG(nn.Module):
    """VGG-BN built from ``config`` (channel counts and "M" pools), with a 512 -> classes linear head."""

    # Layer-level grafting blends the convolutions and BatchNorms only, as the published VGG script did:
    # the classifier and the batch counters keep this network's values (docs/METHOD.md §4).
    layer_grafting_keeps = ("classifier.*", "*.num_batches_tracked")

    def __init__(self, config: Sequence[Union[int, str]], num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for entry in config:
            if entry == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers.append(ConvBNReLU(in_channels, int(entry)))
                in_channels = int(entry)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def _register_config(name: str) -> None:
    """Register the constructor for ``CONFIGS[name]`` under ``name``."""

    def build(num_classes: int = 10, **kwargs) -> CifarVGG:
        return CifarVGG(CONFIGS[name], num_classes=num_classes, **kwargs)

    build.__doc__ = f"CIFAR {name.upper()} with batch normalisation."
    register(name)(build)


for _name in CONFIGS:
    _register_config(_name)
