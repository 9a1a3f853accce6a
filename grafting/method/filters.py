"""Invalid-filter counting (docs/METHOD.md §1): filters whose l1 norm is below a threshold."""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["conv_filter_keys", "count_invalid_filters", "filter_l1_norms", "conv_filter_norms", "per_filter"]


def conv_filter_keys(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """The paper's rule: conv weights are the entries whose key contains ``conv`` (biases excluded)."""
    return [k for k, t in state_dict.items() if "conv" in k and t.dim() > 1]


def filter_l1_norms(weight: torch.Tensor) -> torch.Tensor:
    """l1 norm of each output filter ``weight[j]``, in the weight's dtype.

    Computed as the published code did (``torch.norm(u, p=1, dim=(1, 2, 3))``) on the standard layout:
    a channels_last weight sums its values in another order, which moves a norm by an ulp, and a filter
    whose norm sits at the threshold would then be counted differently.
    """
    weight = weight.detach().contiguous()
    if weight.dim() < 2:  # one value per filter
        return weight.abs()
    return torch.linalg.vector_norm(weight, ord=1, dim=tuple(range(1, weight.dim())))


def per_filter(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A vector with one value per filter (output channel) of ``weight``, shaped to broadcast over it."""
    return values.view(-1, *([1] * (weight.dim() - 1)))


def conv_filter_norms(state_dict: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The l1 norm of every filter the paper counts (the conv keys), in one float32 tensor; empty when no
    key says ``conv``."""
    norms = [filter_l1_norms(state_dict[k]).float() for k in conv_filter_keys(state_dict)]
    return torch.cat(norms) if norms else torch.zeros(0)


def count_invalid_filters(state_dict: Mapping[str, torch.Tensor], threshold: float) -> tuple[int, int]:
    """(invalid, total) filters of the conv weights under the paper's key rule at ``threshold``.

    ResNet-32 has 1136 filters in total and the CIFAR MobileNetV2 17088 (its 1x1 shortcut convs,
    keyed ``shortcut.0``, are not counted, as in the paper).
    """
    norms = [filter_l1_norms(state_dict[k]) for k in conv_filter_keys(state_dict)]
    if not norms:
        return 0, 0
    counts = torch.stack(
        [torch.stack([(n < threshold).sum(), torch.tensor(n.numel(), device=n.device)]) for n in norms]
    )
    invalid, total = counts.sum(dim=0).tolist()
    return int(invalid), int(total)
