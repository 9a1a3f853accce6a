"""The authors' published computations, restated for the tests (docs/METHOD.md §2-§4 and §9).

Each function walks the published loop step by step with the published arithmetic: 0-dim float32
tensors for the entropy, numpy for the coefficient, ``u * w + v * (1 - w)`` per tensor and
``load_state_dict`` for blending (which truncates a float32 counter into its int64 buffer), one
``randn`` per invalid filter from the global generator for noise, the in-place ``inside`` loop. They
are slow on purpose and exist only so that the project's vectorised code can be compared with them
by ``torch.equal``. Where the project corrects the published code (constant tensors, per-channel
BatchNorm blending at filter level), the correction is named in the docstring.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Callable

import numpy as np
import torch
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
    blended the whole tensor once per channel. The convs as published: the input slice j of conv i by
    the previous BatchNorm's ``w_j``, then filter j by its own."""
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
