"""Grafting one network's weights into another, in memory (docs/METHOD.md §4).

Layer level: every group of state_dict entries shares one coefficient alpha, computed from the
information (entropy, or l1 norm) of the group's scoring tensor in both networks. Two rules decide
the groups:

- ``"name"``, the published rule: walk the state_dict in order; each entry whose key contains
  ``conv`` starts a group scored by itself, every other entry joins the group before it.
- ``"module"``, for models whose keys never say ``conv`` (torchvision VGG, MobileNetV2, DenseNet):
  each Conv or Linear weight starts a group that holds its bias and the BatchNorm right after it
  (when the channel counts agree); any other module with state forms its own group.

A model may declare entries that layer grafting leaves alone (``layer_grafting_keeps``, see
:func:`kept_entries`): the CIFAR VGGs keep their classifier and batch counters, as the published VGG
script grafted the convolutions and BatchNorms only. Blending follows the published arithmetic:
``own * alpha + peer * (1 - alpha)`` in the tensors' dtype, and integer counters go through float32
and are truncated back, as loading the published code's float32 blend into an int64 buffer did.

Filter level: per output channel j of each conv followed by a BatchNorm, ``w_j = |g1_j| / (|g1_j| +
|g2_j|)`` blends filter j and input slice j of the next conv. The BatchNorm is blended per channel
(``bn_blend="per-channel"``, channel j with ``w_j``), or as the published loop did it
(``"repeated-whole"``: the whole BatchNorm once per channel, channel after channel, which leaves each
network with its peer's BatchNorm to within float32 rounding).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from grafting.checkpoint import state_dict_misfit
from grafting.errors import LIBRARY, GraftingError, PeerMismatchError, UsageError, Wording
from grafting.method.entropy import entropy_tensors, l1_tensor
from grafting.method.filters import per_filter
from grafting.method.weighting import DEFAULT_A, DEFAULT_C, graft_coefficients

__all__ = [
    "LayerRecord",
    "FilterRecord",
    "graft_layers",
    "graft_filters",
    "unwrap_model",
    "default_rule",
    "fit_problem",
    "kept_entries",
    "check_peer_state",
    "check_rule",
    "check_criterion",
    "check_bn_blend",
    "RULES",
    "CRITERIA",
    "BN_BLENDS",
    "KEEPS_ATTRIBUTE",
]

RULES = ("name", "module")
CRITERIA = ("entropy", "l1")
# How filter-level grafting blends a BatchNorm: channel j with w_j, or the published loop (docs/METHOD.md §10.2).
BN_BLENDS = ("per-channel", "repeated-whole")
# The BatchNorm entries filter-level grafting blends, in the published loop's order.
_BN_PARTS = ("weight", "bias", "running_var", "running_mean")
# The model attribute that lists (fnmatch patterns of) state_dict keys layer grafting leaves alone.
KEEPS_ATTRIBUTE = "layer_grafting_keeps"


def check_rule(rule: str, words: Wording = LIBRARY) -> None:
    """Raise :class:`UsageError` unless ``rule`` is one of :data:`RULES` (the message in ``words``)."""
    if rule not in RULES:
        raise UsageError(f"unknown graft rule '{rule}' ({words.name('rule')}); choose one of: {', '.join(RULES)}")


def check_criterion(criterion: str, words: Wording = LIBRARY) -> None:
    """Raise :class:`UsageError` unless ``criterion`` is one of :data:`CRITERIA` (the message in ``words``)."""
    if criterion not in CRITERIA:
        raise UsageError(
            f"unknown grafting criterion '{criterion}' ({words.name('criterion')}); "
            f"choose one of: {', '.join(CRITERIA)}"
        )


def check_bn_blend(bn_blend: str, words: Wording = LIBRARY) -> None:
    """Raise :class:`UsageError` unless ``bn_blend`` is one of :data:`BN_BLENDS` (the message in ``words``)."""
    if bn_blend not in BN_BLENDS:
        raise UsageError(
            f"unknown BatchNorm blend '{bn_blend}' ({words.name('bn_blend')}); choose one of: {', '.join(BN_BLENDS)}"
        )


@dataclass(frozen=True)
class LayerRecord:
    """One coefficient of layer-level grafting: the scoring key, both scores and alpha.

    ``keys`` lists every state_dict entry that was blended with this alpha.
    """

    key: str
    h_self: float
    h_peer: float
    alpha: float
    keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class FilterRecord:
    """Filter-level grafting of one conv: its key and the mean and extremes of its channel weights."""

    key: str
    mean_w: float
    min_w: float
    max_w: float


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DataParallel, DistributedDataParallel or torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def default_rule(model: nn.Module) -> str:
    """``"name"`` when the model's first grafted state_dict entry is a conv by the key rule (the published
    setting, e.g. CIFAR and torchvision ResNets), else ``"module"`` (torchvision VGG, MobileNet ...)."""
    return "name" if fit_problem(model, level="layer", rule="name") is None else "module"


def _name_rule_misfit(key: str) -> str:
    return f"the name rule needs the first state_dict entry to be a conv (a key containing 'conv'), but it is '{key}'"


_NO_CONV_BN = "filter-level grafting needs convolutions followed by BatchNorm"


def fit_problem(model: nn.Module, *, level: str, rule: str) -> str | None:
    """Why ``model`` cannot be grafted at ``level`` (``"layer"`` or ``"filter"``) with ``rule``, or None when
    it can: checked before training, so that a misfit never waits for the end of an epoch. The name rule
    needs its first grafted entry to be a conv; filter level needs a conv followed by its BatchNorm."""
    model = unwrap_model(model)
    if level == "filter":
        return None if _conv_bn_pairs(model) else _NO_CONV_BN
    if rule == "name":
        own = model.state_dict()
        kept = set(kept_entries(model, own))
        first = next((key for key in own if key not in kept), None)
        if first is not None and "conv" not in first:
            return _name_rule_misfit(first)
    return None


def kept_entries(model: nn.Module, state: Mapping[str, torch.Tensor] | None = None) -> list[str]:
    """The state_dict keys of ``model`` that layer-level grafting leaves as they are, in state_dict order.

    A model declares them with a class attribute ``layer_grafting_keeps``: shell-style patterns
    (``fnmatch``, case-sensitive) matched against the full keys, e.g. ``("classifier.*",
    "*.num_batches_tracked")`` for the CIFAR VGGs. Models without the attribute keep nothing.
    """
    model = unwrap_model(model)
    patterns = tuple(getattr(model, KEEPS_ATTRIBUTE, ()))
    keys = model.state_dict() if state is None else state
    return [k for k in keys if any(fnmatchcase(k, p) for p in patterns)]


def check_peer_state(
    own: Mapping[str, torch.Tensor], peer: Mapping[str, torch.Tensor], source: str = "the peer's weights"
) -> None:
    """Raise :class:`PeerMismatchError` unless ``peer`` has exactly ``own``'s keys and shapes (and floats
    where ``own`` has floats): grafting another architecture in is never what a user wants."""
    problem = state_dict_misfit(own, peer)
    if problem:
        raise PeerMismatchError(
            f"{source} {problem}; all networks of a ring must be the same architecture with the same number of classes"
        )


def _name_rule_groups(state: Mapping[str, torch.Tensor]) -> list[tuple[str, list[str]]]:
    groups: list[tuple[str, list[str]]] = []
    for key in state:
        if "conv" in key:
            groups.append((key, [key]))
        elif groups:
            groups[-1][1].append(key)
        else:
            raise GraftingError(f"{_name_rule_misfit(key)}; use the module rule ({LIBRARY.value('rule', 'module')})")
    return groups


def _module_entries(prefix: str, module: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    names = [n for n, _ in module.named_parameters(recurse=False)] + [n for n, _ in module.named_buffers(recurse=False)]
    return [prefix + n for n in names if prefix + n in state]


def _score_key(keys: list[str], state: Mapping[str, torch.Tensor]) -> str:
    """The entry that scores a group: its 'weight' when present, else its first float tensor."""
    for key in keys:
        if key.endswith("weight") and torch.is_floating_point(state[key]):
            return key
    for key in keys:
        if torch.is_floating_point(state[key]):
            return key
    return keys[0]


def _module_rule_groups(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[tuple[str, list[str]]]:
    groups: list[tuple[str, list[str]]] = []
    last_weighted: tuple[nn.Module, list[str]] | None = None  # the conv/linear a BatchNorm may join
    for name, module in model.named_modules():
        entries = _module_entries(f"{name}." if name else "", module, state)
        if not entries:
            continue
        if isinstance(module, (_ConvNd, nn.Linear)):
            group = (_score_key(entries, state), entries)
            groups.append(group)
            last_weighted = (module, entries)
            continue
        if isinstance(module, _BatchNorm) and last_weighted is not None:
            producer = last_weighted[0]
            channels = producer.out_channels if isinstance(producer, _ConvNd) else producer.out_features
            if channels == module.num_features:
                last_weighted[1].extend(entries)
                last_weighted = None  # one BatchNorm per conv
                continue
        groups.append((_score_key(entries, state), entries))
        last_weighted = None
    # Entries no module claimed (shared modules, exotic registrations): never leave them unblended.
    claimed = {k for _, keys in groups for k in keys}
    for key in state:
        if key not in claimed:
            groups.append((key, [key]))
    return groups


def _copy_views(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """``tensors``, views of one storage, on ``device`` with one copy of that storage (asynchronous from
    pinned memory) and a view of the copy for each: an exchange file's buffer crosses to a GPU at once
    instead of in hundreds of small copies."""
    storage = tensors[0].untyped_storage()
    whole = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
    copied = whole.to(device, non_blocking=True, copy=True).untyped_storage()
    return [
        torch.empty(0, dtype=t.dtype, device=device).set_(copied, t.storage_offset(), t.shape, t.stride())
        for t in tensors
    ]


def _peer_tensors(own: Mapping[str, torch.Tensor], peer: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The peer's entries of ``own``'s keys on ``own``'s devices and in its dtypes."""
    chosen = [peer[k] for k in own]
    devices = {t.device for t in own.values()}
    if chosen and len(devices) == 1:
        device, storage = devices.pop(), chosen[0].untyped_storage()
        shared = all(t.untyped_storage().data_ptr() == storage.data_ptr() for t in chosen)
        if shared and storage.device != device:
            chosen = _copy_views(chosen, device)
    # non_blocking only towards the GPU: a copy to the CPU must be complete before it is read.
    return {
        k: p.to(device=t.device, dtype=t.dtype, non_blocking=t.device.type == "cuda")
        for (k, t), p in zip(own.items(), chosen)
    }


@torch.no_grad()
def _blend_(own: list[torch.Tensor], peer: list[torch.Tensor], alphas: list[float]) -> None:
    """own <- own * alpha + peer * (1 - alpha), in place, tensor by tensor, as the published code computed it.

    Floats: both products and the sum in the tensor's dtype (the Python float alpha rounded to it).
    Integers (``num_batches_tracked``): the published blend of an int64 tensor with a Python float is a
    float32 tensor, and loading it back into the int64 buffer truncates toward zero; so here.
    """
    float_idx = [i for i, t in enumerate(own) if torch.is_floating_point(t)]
    if float_idx:
        mine = [own[i] for i in float_idx]
        torch._foreach_mul_(mine, [alphas[i] for i in float_idx])
        torch._foreach_add_(mine, torch._foreach_mul([peer[i] for i in float_idx], [1 - alphas[i] for i in float_idx]))
    for i, t in enumerate(own):
        if not torch.is_floating_point(t):  # num_batches_tracked and friends
            mixed = t.to(torch.float32) * alphas[i] + peer[i].to(torch.float32) * (1 - alphas[i])
            t.copy_(mixed)  # float -> int conversion truncates toward zero


@torch.no_grad()
def graft_layers(
    model: nn.Module,
    peer_state: Mapping[str, torch.Tensor],
    a: float = DEFAULT_A,
    c: float = DEFAULT_C,
    rule: str = "name",
    criterion: str = "entropy",
) -> list[LayerRecord]:
    """Graft ``peer_state`` into ``model`` in place, layer by layer (docs/METHOD.md §3-§4).

    Args:
        model: the network to update (wrappers such as DDP are looked through).
        peer_state: the ring predecessor's pre-graft state_dict (any device).
        a, c: the weighting's hyper-parameters.
        rule: ``"name"`` (published, key contains ``conv``) or ``"module"`` (by module type).
        criterion: ``"entropy"`` (the method) or ``"l1"`` (the ablation of §9).

    Entries the model declares in ``layer_grafting_keeps`` (:func:`kept_entries`) are neither scored
    nor blended, under either rule.

    Returns:
        One :class:`LayerRecord` per coefficient, in state_dict order.
    """
    check_rule(rule)
    check_criterion(criterion)
    model = unwrap_model(model)
    own = model.state_dict()
    check_peer_state(own, peer_state)
    kept = set(kept_entries(model, own))
    grafted = {k: t for k, t in own.items() if k not in kept}
    groups = _name_rule_groups(grafted) if rule == "name" else _module_rule_groups(model, grafted)
    peer = _peer_tensors(grafted, peer_state)

    scored = [grafted[k] for k, _ in groups] + [peer[k] for k, _ in groups]
    if not scored:  # the model keeps every entry
        scores = []
    elif criterion == "entropy":  # batched by shape: a few dozen kernels for the whole model, not thousands
        scores = entropy_tensors(scored).tolist()  # the one host synchronisation
    else:  # the published float32 torch.norm(u, p=1) of each layer
        scores = torch.stack([l1_tensor(t).to(scored[0].device) for t in scored]).tolist()  # the one sync
    # All coefficients at once, on the host: numpy's arctan is the published arithmetic to the last bit
    # (a device's atan is not), and the blend below queues behind it without another synchronisation.
    n = len(groups)
    alphas = graft_coefficients(np.array(scores[:n]), np.array(scores[n:]), a=a, c=c).tolist()
    records = []
    alpha_of: dict[str, float] = {}
    for g, (score_key, keys) in enumerate(groups):
        records.append(LayerRecord(score_key, scores[g], scores[n + g], alphas[g], tuple(keys)))
        alpha_of.update(dict.fromkeys(keys, alphas[g]))

    keys = list(grafted)
    _blend_([grafted[k] for k in keys], [peer[k] for k in keys], [alpha_of[k] for k in keys])
    return records


def _conv_bn_pairs(model: nn.Module) -> list[tuple[str, nn.Conv2d, str, _BatchNorm, str | None]]:
    """(conv name, conv, bn name, bn, next conv name) for every conv directly followed by its BatchNorm."""
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, _BatchNorm))]
    pairs = []
    for idx, (name, module) in enumerate(modules[:-1]):
        bn_name, bn = modules[idx + 1]
        if not (isinstance(module, nn.Conv2d) and isinstance(bn, _BatchNorm)):
            continue
        if not bn.affine or bn.num_features != module.out_channels:
            continue
        consumer = next(((n, m) for n, m in modules[idx + 2 :] if isinstance(m, nn.Conv2d)), None)
        next_name = None
        if consumer is not None and consumer[1].groups == 1 and consumer[1].in_channels == module.out_channels:
            next_name = consumer[0]
        pairs.append((name, module, bn_name, bn, next_name))
    return pairs


@torch.no_grad()
def graft_filters(
    model: nn.Module, peer_state: Mapping[str, torch.Tensor], bn_blend: str = "per-channel"
) -> list[FilterRecord]:
    """Graft ``peer_state`` into ``model`` in place, filter by filter (docs/METHOD.md §4, the VGG table).

    For each conv followed by a BatchNorm with scales g1 (own) and g2 (peer), channel j gets
    ``w_j = |g1_j| / (|g1_j| + |g2_j|)`` (0.5 where both are 0). Filter j of the conv (and its bias) and
    input slice j of the next conv are blended ``own * w_j + peer * (1 - w_j)``. A conv that is both blends
    twice, as the published code did: first its input slices with the previous BatchNorm's weights, then
    its filters with its own. The BatchNorm (weight, bias, running mean and variance):

    - ``bn_blend="per-channel"``: channel j is blended with ``w_j`` (the method as the paper states it);
    - ``"repeated-whole"``: the published loop, bit for bit: the whole BatchNorm is blended with ``w_0``,
      then the result with ``w_1``, and so on through every channel, so each entry ends as
      ``peer + (own - peer) * prod_j w_j``: the peer's BatchNorm to within float32 rounding.

    Every weight is computed from the pre-graft values. Entries outside these pairs (the classifier,
    counters) keep their own values.
    """
    check_bn_blend(bn_blend)
    model = unwrap_model(model)
    own = model.state_dict()
    check_peer_state(own, peer_state)
    peer = _peer_tensors(own, peer_state)
    pairs = _conv_bn_pairs(model)
    if not pairs:
        raise GraftingError(f"{_NO_CONV_BN}; graft per layer ({LIBRARY.value('level', 'layer')})")

    weights: dict[str, torch.Tensor] = {}
    for conv_name, _, bn_name, _, _ in pairs:
        g1, g2 = own[f"{bn_name}.weight"].abs(), peer[f"{bn_name}.weight"].abs()
        total = g1 + g2
        weights[conv_name] = torch.where(total > 0, g1 / torch.where(total > 0, total, 1), torch.full_like(g1, 0.5))

    def as_inputs(w: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return w.view(1, -1, *([1] * (weight.dim() - 2)))

    inputs_of = {next_name: weights[conv_name] for conv_name, _, _, _, next_name in pairs if next_name is not None}
    steps: list[tuple[str, torch.Tensor]] = []  # (entry, coefficient broadcast over it), applied in order
    whole_bn: list[tuple[list[str], torch.Tensor]] = []  # (a BatchNorm's entries, its w) for "repeated-whole"
    for conv_name, conv, bn_name, _, _ in pairs:
        w = weights[conv_name]
        if conv_name in inputs_of:
            steps.append((f"{conv_name}.weight", as_inputs(inputs_of.pop(conv_name), conv.weight)))
        steps.append((f"{conv_name}.weight", per_filter(w, conv.weight)))
        if conv.bias is not None:
            steps.append((f"{conv_name}.bias", w))
        bn_keys = [f"{bn_name}.{part}" for part in _BN_PARTS if f"{bn_name}.{part}" in own]
        if bn_blend == "per-channel":
            steps += [(key, w) for key in bn_keys]
        else:
            whole_bn.append((bn_keys, w))
    for conv_name, w_in in inputs_of.items():  # a consumer conv without a BatchNorm of its own
        steps.append((f"{conv_name}.weight", as_inputs(w_in, own[f"{conv_name}.weight"])))

    for key, k in steps:
        own[key].mul_(k).add_(peer[key] * (1 - k))
    _blend_whole_per_channel_(own, peer, whole_bn)
    stats = torch.stack([torch.stack([w.mean(), w.min(), w.max()]) for w in weights.values()]).tolist()
    return [FilterRecord(f"{name}.weight", *s) for name, s in zip(weights, stats)]


def _blend_whole_per_channel_(
    own: Mapping[str, torch.Tensor], peer: Mapping[str, torch.Tensor], batchnorms: list[tuple[list[str], torch.Tensor]]
) -> None:
    """The published filter-level BatchNorm loop: for j = 0 .. n-1, every entry ``t`` of a BatchNorm becomes
    ``t * w_j + p * (1 - w_j)`` as a whole, in place.

    The n steps must run in order (each rounds), but every element goes through the same float32
    operations as in the published loop, so all BatchNorms of one width and dtype go through them
    together: one row per entry, each row with its own BatchNorm's weights.
    """
    groups: dict[tuple[int, torch.dtype, torch.device], list[tuple[str, torch.Tensor]]] = {}
    for keys, w in batchnorms:
        for key in keys:
            groups.setdefault((w.numel(), own[key].dtype, own[key].device), []).append((key, w))
    for (width, dtype, _), rows in groups.items():
        keys = [key for key, _ in rows]
        mine = torch.stack([own[key] for key in keys])
        theirs = torch.stack([peer[key] for key in keys])
        w = torch.stack([w.to(dtype) for _, w in rows])
        one_minus_w = 1 - w  # the published (1 - w_j), elementwise in the same dtype
        for j in range(width):
            mine = mine * w[:, j : j + 1] + theirs * one_minus_w[:, j : j + 1]
        for key, row in zip(keys, mine):
            own[key].copy_(row)
