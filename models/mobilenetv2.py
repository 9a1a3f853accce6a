"""MobileNetV2 (Sandler et al., 2018) adapted to 32x32 CIFAR images.

Differences from the ImageNet network: the stem is a stride-1 3x3 convolution and the
second stage keeps stride 1, so the feature map is 4x4 before the final pooling. Stride-1
blocks always add a residual; when their channel count changes, the residual goes through
a 1x1 conv + BN under ``shortcut`` (keys ``shortcut.0.weight``, which the paper's
``conv``-substring rule deliberately does not count).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register

# (expansion, out_channels, num_blocks, stride of the stage's first block)
CIFAR_STAGES = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 2 on ImageNet; 1 keeps enough resolution for 32x32 inputs
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 linear projection; residual only at stride 1."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        hidden = expansion * in_planes
        self.conv1 = nn.Conv2d(in_planes, hidden, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, kernel_size=3, stride=stride, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        # An empty Sequential is the identity and adds no state_dict keys.
        self.shortcut = nn.Sequential()
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 1:
            out = out + self.shortcut(x)
        return out


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs: stem, 17 inverted-residual blocks, 1x1 conv to 1280, linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.layers = self._make_blocks(in_planes=32)
        self.conv2 = nn.Conv2d(320, 1280, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.linear = nn.Linear(1280, num_classes)

    @staticmethod
    def _make_blocks(in_planes: int) -> nn.Sequential:
        """All inverted-residual blocks in one flat Sequential, numbered ``layers.0`` onwards."""
        blocks = []
        for expansion, out_planes, num_blocks, stride in CIFAR_STAGES:
            for block_stride in [stride] + [1] * (num_blocks - 1):
                blocks.append(InvertedResidual(in_planes, out_planes, expansion, block_stride))
                in_planes = out_planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.avg_pool2d(out, 4).flatten(1)
        return self.linear(out)


@register("mobilenetv2")
def mobilenetv2(num_classes: int = 10, **kwargs) -> CifarMobileNetV2:
    """CIFAR MobileNetV2 (17,088 filters under the paper's counting rule)."""
    return CifarMobileNetV2(num_classes=num_classes, **kwargs)
