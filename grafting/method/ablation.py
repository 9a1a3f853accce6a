"""The alternatives to external grafting that the CVPR paper compares against (docs/METHOD.md §9).

- noise grafting: every invalid filter (l1 norm below a threshold) of the network itself gets
  Gaussian noise whose scale decays as ``0.975 ** epoch``;
- internal grafting: within each conv layer the weakest filters borrow from the strongest ones of
  the same layer (weakest + strongest, second weakest + second strongest, ...), as long as the
  weak one is invalid;
- plain averaging: every network becomes the unweighted mean of all N networks.

The l1-norm criterion needs nothing here: it is external grafting with another layer score
(``criterion="l1"`` of :func:`grafting.graft.graft_layers`).

Which tensors are conv filters follows the grafting rule: ``"name"`` takes the entries whose key
contains ``conv`` (the paper's counting rule), ``"module"`` the weights of every convolution module.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from grafting.errors import GraftingError, UsageError
from grafting.method.filters import conv_filter_keys, filter_l1_norms
from grafting.method.graft import check_peer_state, check_rule, unwrap_model

__all__ = ["SOURCES", "NOISE_DECAY", "check_source", "conv_weights", "noise_graft_", "internal_graft_", "average_states",
           "average_into_"]

# Where a network's new weights come from after an epoch: the method and its ablations.
SOURCES = ("external", "internal", "noise", "average")
# The noise scale is multiplied by this once per epoch (the authors' choice).
NOISE_DECAY = 0.975


def check_source(source: str) -> None:
    """Raise :class:`UsageError` unless ``source`` is one of :data:`SOURCES`."""
    if source not in SOURCES:
        raise UsageError(f"unknown graft source '{source}' (--graft-source); choose one of: {', '.join(SOURCES)}")


def conv_weights(model: nn.Module, rule: str = "name") -> dict[str, torch.Tensor]:
    """The conv weight tensors of ``model`` (live, so in-place edits change the model), by key."""
    check_rule(rule)
    model = unwrap_model(model)
    state = model.state_dict(keep_vars=True)
    if rule == "name":
        keys = conv_filter_keys(state)
    else:
        keys = [f"{name}.weight" for name, module in model.named_modules()
                if isinstance(module, _ConvNd) and f"{name}.weight" in state]
    return {key: state[key].data for key in keys}


def _per_filter(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A per-filter (output channel) vector shaped to broadcast over ``weight``."""
    return mask.view(-1, *([1] * (weight.dim() - 1)))


@torch.no_grad()
def noise_graft_(
    model: nn.Module,
    epoch: int,
    *,
    threshold: float = 0.1,
    rule: str = "name",
    std: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """Add Gaussian noise to every invalid filter of ``model`` in place; returns how many were touched.

    The noise of layer W has standard deviation ``base * 0.975 ** epoch``, where ``base`` is ``std``
    when given and otherwise the standard deviation of all of W's weights (measured before the
    noise). A fixed ``std = 1`` would swamp a layer whose typical weight is ~0.05; scaling by the layer
    gives an invalid filter the magnitude of its neighbours, which is what "reactivating" it means.
    ``epoch`` is the epoch just finished (1-based). Valid filters are left exactly as they were.
    """
    scale = NOISE_DECAY ** epoch
    touched = []
    for weight in conv_weights(model, rule).values():
        invalid = filter_l1_norms(weight) < threshold
        base = weight.float().std(correction=0) if std is None else torch.tensor(float(std), device=weight.device)
        noise = torch.randn(weight.shape, generator=generator, device=weight.device, dtype=torch.float32)
        weight.add_((noise * (base * scale) * _per_filter(invalid, weight)).to(weight.dtype))
        touched.append(invalid.sum())
    return int(torch.stack(touched).sum()) if touched else 0


@torch.no_grad()
def internal_graft_(model: nn.Module, *, threshold: float = 0.1, rule: str = "name") -> int:
    """Graft each conv layer's strongest filters onto its invalid ones, in place; returns how many.

    Filters are sorted by l1 norm. The k-th weakest gets the k-th strongest added to it (weakest
    plus strongest first), for k = 0, 1, ... until the k-th weakest is valid (l1 >= ``threshold``) or
    the two ends meet in the middle, so a filter is never both giver and receiver. Every sum uses
    the weights from before the step.
    """
    touched = []
    for weight in conv_weights(model, rule).values():
        norms = filter_l1_norms(weight)
        n = norms.numel()
        order = torch.argsort(norms, stable=True)  # weakest first
        rank = torch.arange(n, device=weight.device)
        # Sorted ascending, so "the k-th weakest is invalid" holds for a prefix of the ranks.
        pairs = (norms[order] < threshold) & (rank < n // 2)
        donors = weight[order.flip(0)] * _per_filter(pairs, weight).to(weight.dtype)
        weight.index_add_(0, order, donors)
        touched.append(pairs.sum())
    return int(torch.stack(touched).sum()) if touched else 0


@torch.no_grad()
def average_states(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The entry-by-entry mean of several state_dicts (same keys and shapes), on the first one's devices.

    Sums run in float64 and in the given order, so every network that averages the same states in
    the same order gets bit-identical weights. Integer buffers (``num_batches_tracked``) are rounded
    and keep their dtype.
    """
    if not states:
        raise GraftingError("nothing to average: no state_dicts given")
    first = states[0]
    for other in states[1:]:
        check_peer_state(first, other, "a peer's weights")
    mean = {}
    for key, tensor in first.items():
        total = torch.zeros(tensor.shape, dtype=torch.float64, device=tensor.device)
        for state in states:
            total += state[key].to(device=tensor.device, dtype=torch.float64)
        total /= len(states)
        mean[key] = total.to(tensor.dtype) if torch.is_floating_point(tensor) else torch.round(total).to(tensor.dtype)
    return mean


@torch.no_grad()
def average_into_(model: nn.Module, states: Sequence[Mapping[str, torch.Tensor]]) -> None:
    """Replace ``model``'s weights by the plain mean of ``states`` (which should include its own)."""
    module = unwrap_model(model)
    own = module.state_dict()
    mean = average_states(states)
    for key, tensor in own.items():
        tensor.copy_(mean[key])
