"""CIFAR ResNets of He et al. (2016), section 4.2, with option-A (parameter-free) shortcuts.

Depth 6n + 2: a 3x3 stem, three stages of n basic blocks at 16, 32 and 64 channels (the
last two halve the resolution), global average pooling and one linear layer. The pooling is the
published ``avg_pool2d`` with one window over the whole map, so training matches the authors' model
definition bit for bit on the CPU (docs/METHOD.md §6). The ``_leaky`` variants swap ReLU for
LeakyReLU(0.01) and keep every state_dict key.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register

LEAKY_SLOPE = 0.01


def _activation(leaky: bool) -> nn.Module:
    """ReLU, or LeakyReLU with slope ``LEAKY_SLOPE`` when ``leaky``."""
    return nn.LeakyReLU(LEAKY_SLOPE) if leaky else nn.ReLU()


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad the new channels; no parameters."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = out_planes - in_planes
        # Split the zero channels evenly on both sides, as the original option A does.
        self.pad_front = extra // 2
        self.pad_back = extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or option-A shortcut around them."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, leaky: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act = _activation(leaky)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = PadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs with ``blocks_per_stage`` = n blocks in each of three stages."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, leaky: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.act = _activation(leaky)
        self.in_planes = 16
        self.layer1 = self._make_stage(16, blocks_per_stage, stride=1, leaky=leaky)
        self.layer2 = self._make_stage(32, blocks_per_stage, stride=2, leaky=leaky)
        self.layer3 = self._make_stage(64, blocks_per_stage, stride=2, leaky=leaky)
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def _make_stage(self, planes: int, num_blocks: int, stride: int, leaky: bool) -> nn.Sequential:
        """``num_blocks`` blocks of ``planes`` channels; only the first one changes stride."""
        blocks = []
        for block_stride in [stride] + [1] * (num_blocks - 1):
            blocks.append(BasicBlock(self.in_planes, planes, block_stride, leaky))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        # One window over the whole map, as the published avg_pool2d(out, width) on square inputs (bit for
        # bit; adaptive pooling differs in the last bits); a non-square map is averaged over all of it.
        out = F.avg_pool2d(out, out.shape[2:]).flatten(1)
        return self.linear(out)


def _register_depth(depth: int) -> None:
    """Register ``resnet{depth}`` and ``resnet{depth}_leaky``."""
    blocks_per_stage = (depth - 2) // 6

    def plain(num_classes: int = 10, **kwargs) -> CifarResNet:
        return CifarResNet(blocks_per_stage, num_classes=num_classes, **kwargs)

    def leaky(num_classes: int = 10, **kwargs) -> CifarResNet:
        return CifarResNet(blocks_per_stage, num_classes=num_classes, leaky=True, **kwargs)

    plain.__doc__ = f"CIFAR ResNet-{depth} (option-A shortcuts, ReLU)."
    leaky.__doc__ = f"CIFAR ResNet-{depth} with LeakyReLU({LEAKY_SLOPE})."
    register(f"resnet{depth}")(plain)
    register(f"resnet{depth}_leaky")(leaky)


for _depth in (20, 32, 44, 56, 110, 1202):
    _register_depth(_depth)
