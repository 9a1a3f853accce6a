"""The authors' published computations, restated for the tests (docs/METHOD.md §2-§4, §6-§9).

Each function walks the published loop step by step with the published arithmetic: 0-dim float32
tensors for the entropy, numpy for the coefficient, ``u * w + v * (1 - w)`` per tensor and
``load_state_dict`` for blending (which truncates a float32 counter into its int64 buffer), one
``randn`` per invalid filter from the global generator for noise, the in-place ``inside`` loop, the VGG
script's filter-level ``BN`` loop, the early code's ``grafting_filter``, the CIFAR ResNet definition,
the ImageNet learning rates, the early distillation loop and the invalid-filter count. They are slow on
purpose and exist only so that the project's vectorised code can be compared with them by
``torch.equal``. Where the project corrects the published code (constant tensors, per-channel
BatchNorm blending at filter level), the correction is named in the docstring.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def published_entropy(w: torch.Tensor, n: int = 10) -> float:
    """Per bin a mask over the tensor, ``p = float32 count / len``, ``H -= p * ln(p)`` in float32 from bin 0,
    empty bins skipped. Correction: a constant tensor gives 0 (the published function failed on it)."""
    x = w.reshape(-1) if w.is_floating_point() else w.reshape(-1).float()
    scale = (x.max() - x.min()) / n
    entropy = torch.zeros((), dtype=torch.float32, device=x.device)
    for i in range(n):
        p = torch.sum((x >= x.min() + i * scale) * (x < x.min() + (i + 1) * scale), dtype=torch.float) / len(x)
        if p != 0:
            entropy -= p * torch.log(p)
    return float(entropy)


def published_l1(w: torch.Tensor) -> float:
    """The l1 criterion of the early code: the layer's float32 ``torch.norm(u, p=1)``."""
    return float(torch.norm(w, p=1))


def published_coefficient(h_own: float, h_peer: float, a: float = 0.4, c: float = 500) -> float:
    """``round(a / pi * arctan(c * (h_own - h_peer)) + 0.5, 2)`` in numpy."""
    return float(round(a / np.pi * np.arctan(c * (h_own - h_peer)) + 0.5, 2))


@torch.no_grad()
def published_key_graft(
    model: nn.Module,
    peer: Mapping[str, torch.Tensor],
    a: float = 0.4,
    c: float = 500,
    score: Callable[[torch.Tensor], float] = published_entropy,
) -> None:
    """The CIFAR script's step: walk the state_dict; a key containing ``conv`` sets the coefficient from its
    own scores, every entry is blended with the latest one; then ``load_state_dict``."""
    mixed = OrderedDict()
    w = None
    for key, u in model.state_dict().items():
        if "conv" in key:
            w = published_coefficient(score(u), score(peer[key]), a, c)
        mixed[key] = u * w + peer[key] * (1 - w)
    model.load_state_dict(mixed)


BN_PARTS = ("weight", "bias", "running_var", "running_mean")


@torch.no_grad()
def published_vgg_layer_graft(model: nn.Module, peer: nn.Module, a: float = 0.4, c: float = 500) -> None:
    """The VGG script's layer level: module by module, a Conv2d weight by its own coefficient, the
    BatchNorm after it (weight, bias, running variance and mean) by the same; nothing else changes."""
    w = None
    for m1, m2 in zip(model.modules(), peer.modules()):
        if isinstance(m1, nn.Conv2d):
            w = published_coefficient(published_entropy(m1.weight), published_entropy(m2.weight), a, c)
            m1.weight.copy_(m1.weight.clone() * w + m2.weight.clone() * (1 - w))
        if isinstance(m1, nn.BatchNorm2d):
            for part in BN_PARTS:
                t1, t2 = getattr(m1, part), getattr(m2, part)
                t1.copy_(t1.clone() * w + t2.clone() * (1 - w))


@torch.no_grad()
def vgg_filter_graft_per_channel(model: nn.Module, peer: nn.Module) -> None:
    """The VGG script's filter level with the documented correction: channel j of each BatchNorm is blended
    with its own ``w_j = |g1_j| / (|g1_j| + |g2_j|)`` (0.5 where both are 0), where the published loop
    blended the whole tensor once per channel. The convs as published (:func:`_published_vgg_conv_blend`)."""
    weights = []
    for m1, m2 in zip(model.modules(), peer.modules()):
        if isinstance(m1, nn.BatchNorm2d):
            g1, g2 = m1.weight.abs(), m2.weight.abs()
            w = g1 / (g1 + g2)
            w[(g1 + g2) == 0] = 0.5
            weights.append(w)
            for j, wj in enumerate(w):
                for part in BN_PARTS:
                    t1, t2 = getattr(m1, part), getattr(m2, part)
                    t1[j] = t1[j].clone() * wj + t2[j].clone() * (1 - wj)
    _published_vgg_conv_blend(model, peer, weights)


@torch.no_grad()
def published_vgg_filter_graft(model: nn.Module, peer: nn.Module) -> None:
    """The VGG script's filter level exactly as published (its ``BN`` function): per BatchNorm, module by
    module, ``w = |g1| / (|g1| + |g2|)`` from the pre-graft scales, then for each channel j in order the
    *whole* weight, bias, running variance and running mean become ``t * w_j + p * (1 - w_j)``, with
    ``w_j`` a 0-dim float32 tensor; then the convs (:func:`_published_vgg_conv_blend`)."""
    weights = []
    for m1, m2 in zip(model.modules(), peer.modules()):
        if isinstance(m1, nn.BatchNorm2d):
            weights.append(m1.weight.abs() / (m1.weight.abs() + m2.weight.abs()))
            for wj in weights[-1]:
                for part in BN_PARTS:
                    t1, t2 = getattr(m1, part), getattr(m2, part)
                    t1.copy_(t1.clone() * wj + t2.clone() * (1 - wj))
    _published_vgg_conv_blend(model, peer, weights)


def _published_vgg_conv_blend(model: nn.Module, peer: nn.Module, weights: list[torch.Tensor]) -> None:
    """The published conv loop of filter-level grafting: conv i (module order) has its input slice j blended
    with the previous BatchNorm's ``w_j``, then its filter j with its own BatchNorm's ``w_j``."""
    convs = [(m1, m2) for m1, m2 in zip(model.modules(), peer.modules()) if isinstance(m1, nn.Conv2d)]
    for i, (m1, m2) in enumerate(convs):
        if i:
            for j, wj in enumerate(weights[i - 1]):
                m1.weight[:, j] = m1.weight[:, j].clone() * wj + m2.weight[:, j].clone() * (1 - wj)
        for j, wj in enumerate(weights[i]):
            m1.weight[j] = m1.weight[j].clone() * wj + m2.weight[j].clone() * (1 - wj)


@torch.no_grad()
def published_inside(model: nn.Module, threshold: float = 0.1) -> None:
    """Internal grafting: per key containing ``conv``, filters sorted by l1 norm ascending; from the weakest,
    ``u[order[j]] += u[order[n-1-j]]`` in place while the filter's l1 norm is below the threshold."""
    for key, u in model.state_dict().items():
        if "conv" in key:
            order = torch.argsort(torch.norm(u, p=1, dim=(1, 2, 3)))
            for j in range(len(order)):
                if torch.norm(u[order[j]], p=1) < threshold:
                    u[order[j]] += u[order[len(order) - j - 1]]
                else:
                    break


@torch.no_grad()
def published_noise(model: nn.Module, epoch: int, threshold: float = 0.1) -> None:
    """Noise grafting: per key containing ``conv``, every filter with l1 norm below the threshold gets a unit
    Gaussian (one draw per filter, global generator) times ``0.975 ** epoch``, epochs counted from 0."""
    for key, u in model.state_dict().items():
        if "conv" in key:
            invalid = torch.norm(u, p=1, dim=(1, 2, 3)) < threshold
            for j in range(len(invalid)):
                if invalid[j]:
                    u[j] += torch.randn_like(u[j]) * 0.975**epoch


@torch.no_grad()
def published_grafting_filter(
    model: nn.Module, peers: list[Mapping[str, torch.Tensor]], threshold: float = 0.1
) -> None:
    """The early code's ``grafting_filter``: per key containing ``conv``, filter by filter, when the entropy of
    ``u[j]`` is below the threshold, ``u[j] += peers[k][key][j]`` with ``k`` numpy's argmax (the first of equal
    maxima) of the peers' entropies of their filter j; ``peers`` in the published order, from the
    successor on. Correction: a constant filter has entropy 0 (:func:`published_entropy`)."""
    for key, u in model.state_dict().items():
        if "conv" in key:
            for j, v in enumerate(u):
                if published_entropy(v) < threshold:
                    k = np.argmax([published_entropy(peer[key][j]) for peer in peers])
                    u[j] += peers[k][key][j]


# --- the published CIFAR ResNet (grafting_cifar/models/resnet.py and resnet_leaky.py) --------------------


class _PublishedBasicBlock(nn.Module):
    """Two 3x3 conv-BN layers; the option-A shortcut subsamples by 2 (hard-wired) and zero-pads
    ``planes // 4`` channels on each side; the shortcut is added in place before the last activation."""

    def __init__(self, in_planes: int, planes: int, stride: int, leaky: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes // 4 if stride != 1 or in_planes != planes else None
        self.act = F.leaky_relu if leaky else F.relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)
        return self.act(out)


class PublishedCifarResNet(nn.Module):
    """The published ResNet-(6n+2): stem, three stages of n blocks at 16/32/64 channels, then
    ``F.avg_pool2d(out, out.size()[3])`` (a square window as wide as the feature map, stride equal to it),
    a flatten and the linear layer. Conv and linear weights get ``kaiming_normal_`` through ``apply``
    (children before parents; the leaves come in construction order)."""

    def __init__(self, depth: int, num_classes: int = 10, leaky: bool = False) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.act = F.leaky_relu if leaky else F.relu
        planes_in = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for block_stride in [stride] + [1] * (n - 1):
                blocks.append(_PublishedBasicBlock(planes_in, planes, block_stride, leaky))
                planes_in = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        self.apply(_published_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


def _published_init(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.kaiming_normal_(module.weight)


# --- the published ImageNet schedules (grafting_imagenet/baseline.py and grafting.py) -----------------------


def published_imagenet_baseline_lr(lr0: float, epoch: int) -> float:
    """baseline.py sets, before each epoch (counted from 0), ``lr0 * (0.1 ** (epoch // 30))``."""
    return lr0 * (0.1 ** (epoch // 30))


def published_imagenet_grafting_lr(lr0: float, epoch: int, i: int, iters: int, epochs: int, steplr: bool) -> float:
    """grafting.py sets, before batch ``i`` of ``epoch`` (both from 0), the step value above with ``--steplr``,
    else ``lr0 * (1 + np.cos(np.pi * (epoch * iters + i) / (epochs * iters))) / 2``."""
    if steplr:
        return lr0 * (0.1 ** (epoch // 30))
    return float(lr0 * (1 + np.cos(np.pi * (epoch * iters + i) / (epochs * iters))) / 2)


# --- the published distillation script (early commit, grafting_cifar/distillation.py) ----------------------


def published_distillation_epoch(
    net: nn.Module,
    teachers: list[nn.Module],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    lr0: float,
    epoch: int,
    temperature: float = 2,
) -> None:
    """One epoch of the published distillation loop (``epoch`` from 0): per batch the lr is set to
    ``lr0 * 0.1 ** (epoch // 60)``, the loss is cross-entropy plus ``T * T`` times the batch mean of
    ``sum_k -log_softmax(z / T)_k * softmax(z_t)_k``, where ``z_t`` is the mean over the teachers (in eval
    mode, not detached) of their logits, stacked and averaged along a new first dimension; then SGD. The
    student is not grafted."""
    net.train()
    for images, targets in batches:
        for group in optimizer.param_groups:
            group["lr"] = lr0 * 0.1 ** (epoch // 60)
        optimizer.zero_grad()
        outputs = net(images)
        loss = nn.CrossEntropyLoss()(outputs, targets)
        teacher_logits = torch.mean(torch.cat([t(images).unsqueeze(0) for t in teachers]), 0).squeeze()
        soft = (-F.log_softmax(outputs / temperature, 1) * F.softmax(teacher_logits, 1)).sum(dim=1)
        loss += soft.mean() * temperature * temperature
        loss.backward()
        optimizer.step()


# --- the published invalid-filter count (grafting_cifar/filter_comparison.py) -------------------------------


def published_invalid_filters(state_dict: Mapping[str, torch.Tensor], threshold: float) -> tuple[int, int]:
    """(invalid, total): the l1 norms of the rows of every entry whose key contains ``conv``, each flattened
    to one row per filter, concatenated; invalid are those below ``threshold``, summed as float64."""
    norm = torch.cat(
        [torch.norm(v.reshape(v.shape[0], -1), p=1, dim=1) for key, v in state_dict.items() if "conv" in key]
    )
    return int(sum((norm < threshold).double())), len(norm)
