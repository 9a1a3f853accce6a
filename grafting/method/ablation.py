"""The alternatives to external grafting that the CVPR paper compares against (docs/METHOD.md §9).

Both own-weights ablations follow the loops of the authors' early code, to the bit:

- noise grafting: every invalid filter (l1 norm below a threshold) of the network itself gets unit
  Gaussian noise times ``0.975 ** e``, where ``e`` counts finished epochs from 0; one draw per invalid
  filter, in state_dict order, so the random stream is the published one;
- internal grafting: within each conv layer, sorted by l1 norm ascending, the j-th weakest filter gets
  the j-th strongest added to it, in place, for j = 0, 1, ... until the first filter whose norm is not
  below the threshold. Past the middle of the layer the added filters are ones already changed;
- plain averaging: every network becomes the unweighted mean of all N networks;
- per-filter entropy grafting (the early code's ``grafting_filter``): every conv filter whose own
  entropy is below a threshold gets added to it the same filter of whichever other network holds it
  with the highest entropy.

The l1-norm criterion needs nothing here: it is external grafting with another layer score
(``criterion="l1"`` of :func:`grafting.graft.graft_layers`).

Which tensors are conv filters follows the grafting rule: ``"name"`` takes the entries whose key
contains ``conv`` (the paper's counting rule), ``"module"`` the weights of every convolution module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from grafting.errors import LIBRARY, GraftingError, UsageError, Wording
from grafting.method.entropy import entropy_tensors
from grafting.method.filters import conv_filter_keys, filter_l1_norms, per_filter
from grafting.method.graft import check_peer_state, check_rule, unwrap_model

__all__ = [
    "SOURCES",
    "EXCHANGING_SOURCES",
    "ALL_PEERS_SOURCES",
    "NOISE_DECAY",
    "NOISE_STD",
    "check_source",
    "conv_weights",
    "noise_graft_",
    "internal_graft_",
    "average_states",
    "average_into_",
    "filter_entropy_graft_",
]

# Where a network's new weights come from after an epoch: the method and its ablations.
SOURCES = ("external", "internal", "noise", "average", "filter-entropy")
# The sources that read other networks' weights after each epoch (the others change the network alone) ...
EXCHANGING_SOURCES = ("external", "average", "filter-entropy")
# ... and those among them that read every other network's, not only the ring predecessor's.
ALL_PEERS_SOURCES = ("average", "filter-entropy")
# The noise scale is multiplied by this once per epoch (the authors' choice).
NOISE_DECAY = 0.975
# The standard deviation of the noise before the decay: the published unit Gaussian.
NOISE_STD = 1.0


def check_source(source: str, words: Wording = LIBRARY) -> None:
    """Raise :class:`UsageError` unless ``source`` is one of :data:`SOURCES` (the message in ``words``)."""
    if source not in SOURCES:
        raise UsageError(
            f"unknown graft source '{source}' ({words.name('source')}); choose one of: {', '.join(SOURCES)}"
        )


def conv_weights(model: nn.Module, rule: str = "name") -> dict[str, torch.Tensor]:
    """The conv weight tensors of ``model`` (live, so in-place edits change the model), by key."""
    check_rule(rule)
    model = unwrap_model(model)
    state = model.state_dict(keep_vars=True)
    if rule == "name":
        keys = conv_filter_keys(state)
    else:
        keys = [
            f"{name}.weight"
            for name, module in model.named_modules()
            if isinstance(module, _ConvNd) and f"{name}.weight" in state
        ]
    return {key: state[key].data for key in keys}


@torch.no_grad()
def noise_graft_(
    model: nn.Module,
    epoch: int,
    *,
    threshold: float = 0.1,
    rule: str = "name",
    std: float = NOISE_STD,
    generator: torch.Generator | None = None,
) -> int:
    """Add Gaussian noise to every invalid filter of ``model`` in place; returns how many were touched.

    ``epoch`` numbers the epoch just finished from 0, as the published loop did, and the noise has
    standard deviation ``std * 0.975 ** epoch``: ``std`` (1, the paper's unit Gaussian) after the first
    epoch. Each invalid filter ``W[j]`` (l1 norm below ``threshold``) gets ``W[j] += randn(W[j].shape) * scale``,
    one draw per filter, layer by layer in state_dict order and filter by filter: the published random
    stream, so with the same generator state the result is the published code's to the bit. The draws
    are in the standard layout whatever the weight's memory format. Valid filters are left as they were.
    """
    scale = std * NOISE_DECAY**epoch
    weights = list(conv_weights(model, rule).values())
    if not weights:
        return 0
    invalid = torch.cat([filter_l1_norms(w) < threshold for w in weights]).tolist()  # one sync
    first = 0
    for weight in weights:
        flags, first = invalid[first : first + weight.shape[0]], first + weight.shape[0]
        for j, bad in enumerate(flags):
            if bad:
                noise = torch.randn(weight.shape[1:], generator=generator, device=weight.device, dtype=weight.dtype)
                weight[j] += noise * scale
    return sum(invalid)


@torch.no_grad()
def internal_graft_(model: nn.Module, *, threshold: float = 0.1, rule: str = "name") -> int:
    """Graft each conv layer's strongest filters onto its invalid ones, in place; returns how many.

    The published loop, vectorised: with the filters sorted by l1 norm ascending (``order``), for
    j = 0, 1, ... ``W[order[j]] += W[order[n-1-j]]`` in place, stopping at the first j whose filter is
    valid (l1 >= ``threshold``). A filter's turn comes before anything changes it, so the stop is
    decided on the norms measured first. Past the middle the filter added is one that received in the
    first half (its new value), and the middle filter of an odd layer is added to itself.
    """
    touched = []
    for weight in conv_weights(model, rule).values():
        norms = filter_l1_norms(weight)
        n = norms.numel()
        order = torch.argsort(norms)  # ascending, the published call
        rank = torch.arange(n, device=weight.device)
        # The receivers: the ranks before the first valid filter (cumprod keeps the prefix only).
        active = (norms[order] < threshold).to(torch.int8).cumprod(0).bool()
        mirror = n - 1 - rank
        first_half = active & (rank <= mirror)  # the donor is unchanged (the middle filter: itself)
        second_half = active & (rank > mirror)  # the donor received at step `mirror`, earlier
        sorted_w = weight[order]
        receivers = per_filter(first_half, sorted_w)
        after_first = torch.where(receivers, sorted_w + sorted_w.flip(0), sorted_w)
        receivers = per_filter(second_half, sorted_w)
        after_second = torch.where(receivers, sorted_w + after_first.flip(0), after_first)
        weight[order] = after_second
        touched.append(active.sum())
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


@torch.no_grad()
def filter_entropy_graft_(
    model: nn.Module,
    peer_states: Sequence[Mapping[str, torch.Tensor]],
    *,
    threshold: float = 0.1,
    rule: str = "name",
) -> int:
    """Per-filter entropy grafting (the early code's ``grafting_filter``), in place; returns how many filters.

    For every conv weight (by ``rule``) and every filter j: when the entropy of ``W[j]`` (docs/METHOD.md §2,
    the filter's values alone) is below ``threshold``, ``W[j] += P[j]``, where P is that weight in the peer
    state whose filter j has the highest entropy; among equal entropies the first of ``peer_states`` wins
    (the published code listed the other networks from its successor on, wrapping round: i+1, ..., N, 1,
    ..., i-1). A filter is added, not blended, and every entropy is taken before anything changes.
    """
    if not peer_states:
        raise GraftingError("per-filter entropy grafting needs the weights of at least one other network")
    own = unwrap_model(model).state_dict()
    for peer in peer_states:
        check_peer_state(own, peer, "a peer's weights")
    weights = conv_weights(model, rule)
    if not weights:
        return 0
    plans = []  # (weight, the peers' same weight stacked, own entropies, the peers' entropies)
    for key, weight in weights.items():
        peers = torch.stack([p[key].to(device=weight.device, dtype=weight.dtype) for p in peer_states])
        n = weight.shape[0]
        entropies = entropy_tensors([*weight.contiguous(), *peers.reshape(-1, *weight.shape[1:])]).view(-1, n)
        plans.append((weight, peers, entropies[0], entropies[1:]))
    touched = 0
    for weight, peers, own_entropy, peer_entropy in plans:
        low = own_entropy < threshold
        # argmax gives the first of equal maxima, as numpy's did in the published loop.
        donors = peers[peer_entropy.argmax(dim=0), torch.arange(weight.shape[0], device=weight.device)]
        weight[low] += donors[low]
        touched += int(low.sum())
    return touched
