"""``graft_layers`` as it was before the flat exchange file, the numpy-counted bins on the CPU and the
coefficients computed all at once, frozen as the yardstick of ``tests/test_graft.py``: the library must
leave every entry of a model exactly (``torch.equal``) as this one does.

Frozen are the parts that rewrite changed: the bins of each tensor by ``torch.bucketize`` against its edge
vector, the float32 bin-by-bin sum, one coefficient per layer with numpy's scalar arctan, and the blend.
The groups (name and module rule, kept entries) and the l1 norm are the library's own, which it did not
change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from grafting.method.entropy import l1_tensor
from grafting.method.graft import _module_rule_groups, _name_rule_groups, kept_entries, unwrap_model


def frozen_entropy(w: torch.Tensor, bins: int = 10) -> float:
    """One tensor's entropy: bucketize against ``lo + k * width`` (in w's dtype), float32 p, bin-by-bin sum."""
    flat = (w if w.is_floating_point() else w.float()).detach().reshape(-1)
    if flat.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(flat)
    width = (hi - lo) / bins
    edges = lo + torch.arange(bins + 1, device=flat.device, dtype=flat.dtype) * width
    index = torch.bucketize(flat, edges, right=True)
    counts = torch.zeros(bins + 2, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, index, torch.ones_like(index))
    p = counts[1 : bins + 1].to(torch.float32) / flat.numel()
    terms = p * torch.log(torch.where(p > 0, p, 1.0))
    entropy = torch.zeros((), dtype=torch.float32, device=flat.device)
    for k in range(bins):
        entropy = entropy - terms[k]
    return float(entropy)


def frozen_coefficient(h_self: float, h_peer: float, a: float, c: float) -> float:
    alpha = (a / math.pi) * float(np.arctan(c * (h_self - h_peer))) + 0.5
    return round(alpha * 100) / 100


@torch.no_grad()
def frozen_graft_layers(
    model: nn.Module,
    peer_state: Mapping[str, torch.Tensor],
    a: float = 0.4,
    c: float = 500.0,
    rule: str = "name",
    criterion: str = "entropy",
) -> list[tuple[str, float, float, float]]:
    """Graft ``peer_state`` into ``model`` in place as the frozen code did; ``(key, h_self, h_peer,
    alpha)`` per coefficient."""
    model = unwrap_model(model)
    own = model.state_dict()
    kept = set(kept_entries(model, own))
    grafted = {k: t for k, t in own.items() if k not in kept}
    groups = _name_rule_groups(grafted) if rule == "name" else _module_rule_groups(model, grafted)
    peer = {k: peer_state[k].to(device=t.device, dtype=t.dtype) for k, t in grafted.items()}
    score = frozen_entropy if criterion == "entropy" else (lambda t: float(l1_tensor(t)))
    records, alpha_of = [], {}
    for score_key, keys in groups:
        h_self, h_peer = score(grafted[score_key]), score(peer[score_key])
        alpha = frozen_coefficient(h_self, h_peer, a, c)
        records.append((score_key, h_self, h_peer, alpha))
        alpha_of.update(dict.fromkeys(keys, alpha))
    floats = [k for k, t in grafted.items() if t.is_floating_point()]
    if floats:  # the foreach calls, as their rounding of low-precision dtypes differs from mul_ and add_
        torch._foreach_mul_([grafted[k] for k in floats], [alpha_of[k] for k in floats])
        products = torch._foreach_mul([peer[k] for k in floats], [1 - alpha_of[k] for k in floats])
        torch._foreach_add_([grafted[k] for k in floats], products)
    for key, t in grafted.items():
        if not t.is_floating_point():  # the published float32 blend of a counter, truncated into its int64
            alpha = alpha_of[key]
            t.copy_(t.to(torch.float32) * alpha + peer[key].to(torch.float32) * (1 - alpha))
    return records
