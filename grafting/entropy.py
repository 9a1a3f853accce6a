"""Layer information (METHOD.md §2 and §9): the entropy of a weight histogram, and the l1 norm.

The entropy is what the arctan weighting multiplies by c = 500, so bin membership must match
the published code exactly: the bins are half-open, ``[edge_k, edge_k+1)``, against the explicit
edge vector ``lo + k * width`` computed in the tensor's own dtype, and values equal to the last
edge (normally the maximum) fall in no bin. ``torch.searchsorted`` against that edge vector makes
the same comparisons as the original per-bin loop, in one pass and without leaving the device; many
tensors of one shape share the pass (one row of edges each).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["entropy_tensor", "entropy_tensors", "layer_entropy", "layer_entropies", "layer_l1"]


def _row_entropies(rows: torch.Tensor, bins: int) -> torch.Tensor:
    """Entropy of every row of a 2-D float tensor, as a float64 vector; one set of kernels for all rows."""
    lo, hi = torch.aminmax(rows, dim=1)
    width = (hi - lo) / bins
    # Edges in the rows' dtype, as the published loop computed them: lo + k * width.
    edges = lo[:, None] + torch.arange(bins + 1, device=rows.device, dtype=rows.dtype) * width[:, None]
    # right=True: index i means edges[i-1] <= v < edges[i]; bins 1..bins are the real ones,
    # 0 is below the first edge and bins+1 is at or above the last (the excluded maximum).
    index = torch.searchsorted(edges, rows, right=True)
    # A fixed-size scatter_add_, not bincount: on CUDA bincount reads the index's min and max back to
    # the host to size its output, two hidden synchronisations per tensor.
    counts = torch.zeros(rows.shape[0], bins + 2, dtype=torch.int64, device=rows.device)
    ones = torch.ones((), dtype=torch.int64, device=rows.device).expand_as(index)  # a view, no n-sized fill
    counts = counts.scatter_add_(1, index, ones)[:, 1 : bins + 1]
    # A constant row has width 0: every value equals every edge and lands in no bin -> entropy 0.
    p = counts.to(torch.float64) / rows.shape[1]
    terms = torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))
    return -terms.sum(dim=1)


def _as_float(w: torch.Tensor) -> torch.Tensor:
    return w.detach() if torch.is_floating_point(w) else w.detach().float()


def entropy_tensor(w: torch.Tensor, bins: int = 10) -> torch.Tensor:
    """Entropy of ``w``'s value histogram as a 0-dim float64 tensor on ``w``'s device (no host sync).

    Use this to compute many entropies and synchronise once; :func:`layer_entropy` wraps it.
    """
    flat = _as_float(w).reshape(1, -1)
    if flat.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=w.device)
    return _row_entropies(flat, bins)[0]


# Elements stacked into one batch of :func:`entropy_tensors`: bounds the int64 bin index to 256 MiB.
_BATCH_ELEMENTS = 1 << 25


def entropy_tensors(tensors: Sequence[torch.Tensor], bins: int = 10) -> torch.Tensor:
    """Entropies of many tensors as one float64 vector on the first tensor's device (no host sync).

    Tensors of equal size, dtype and device are stacked and binned together, so a whole network
    costs a few dozen kernels rather than about twenty per tensor, which is what dominates on a GPU.
    Every value is the one :func:`entropy_tensor` gives for that tensor alone.
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    flats = [_as_float(t).reshape(-1) for t in tensors]
    groups: dict[tuple[int, torch.dtype, torch.device], list[int]] = {}
    for i, flat in enumerate(flats):
        groups.setdefault((flat.numel(), flat.dtype, flat.device), []).append(i)
    device = tensors[0].device
    values: list[torch.Tensor | None] = [None] * len(flats)
    for (numel, _, _), members in groups.items():
        if numel == 0:
            for i in members:
                values[i] = torch.zeros((), dtype=torch.float64, device=device)
            continue
        per_batch = max(1, _BATCH_ELEMENTS // numel)
        for first in range(0, len(members), per_batch):
            batch = members[first : first + per_batch]
            rows = _row_entropies(torch.stack([flats[i] for i in batch]), bins).to(device)
            for row, i in enumerate(batch):
                values[i] = rows[row]
    return torch.stack(values)  # type: ignore[arg-type]


def layer_entropy(w: torch.Tensor, bins: int = 10) -> float:
    """Entropy (natural log) of the histogram of ``w``'s values with ``bins`` equal-width bins.

    Exactly METHOD.md §2: bins ``[lo + k*width, lo + (k+1)*width)``, the maximum in no bin, a constant
    tensor gives 0. Works on CPU and CUDA tensors of any float dtype with one host synchronisation.
    Counts are exact; the sum is taken in float64.
    """
    return float(entropy_tensor(w, bins).item())


def layer_entropies(tensors: list[torch.Tensor], bins: int = 10) -> list[float]:
    """Entropies of many tensors with a single host synchronisation (grafting a whole model)."""
    if not tensors:
        return []
    return entropy_tensors(tensors, bins).tolist()


def layer_l1(w: torch.Tensor) -> float:
    """The l1 norm of ``w`` (sum of absolute values), the alternative criterion of METHOD.md §9."""
    return float(w.detach().abs().sum(dtype=torch.float64).item())
