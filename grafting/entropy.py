"""Layer information (METHOD.md §2 and §9): the entropy of a weight histogram, and the l1 norm.

The entropy is what the arctan weighting multiplies by c = 500, so bin membership must match
the published code exactly: the bins are half-open, ``[edge_k, edge_k+1)``, against the explicit
edge vector ``lo + k * width`` computed in the tensor's own dtype, and values equal to the last
edge (normally the maximum) fall in no bin. ``torch.bucketize`` against that edge vector makes the
same comparisons as the original per-bin loop, in one pass and without leaving the device.
"""
from __future__ import annotations

import torch

__all__ = ["entropy_tensor", "layer_entropy", "layer_entropies", "layer_l1"]


def entropy_tensor(w: torch.Tensor, bins: int = 10) -> torch.Tensor:
    """Entropy of ``w``'s value histogram as a 0-dim float64 tensor on ``w``'s device (no host sync).

    Use this to compute many entropies and synchronise once; :func:`layer_entropy` wraps it.
    """
    if not torch.is_floating_point(w):
        w = w.float()
    flat = w.detach().reshape(-1)
    if flat.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=w.device)
    lo, hi = torch.aminmax(flat)
    width = (hi - lo) / bins
    # Edges in w's dtype, as the published loop computed them: lo + k * width.
    edges = lo + torch.arange(bins + 1, device=flat.device, dtype=flat.dtype) * width
    # right=True: index i means edges[i-1] <= v < edges[i]; bins 1..bins are the real ones,
    # 0 is below the first edge and bins+1 is at or above the last (the excluded maximum).
    index = torch.bucketize(flat, edges, right=True)
    # A fixed-size scatter_add_, not bincount: on CUDA bincount reads the index's min and max back to
    # the host to size its output, two hidden synchronisations per tensor.
    counts = torch.zeros(bins + 2, dtype=torch.int64, device=flat.device)
    counts = counts.scatter_add_(0, index, torch.ones_like(index))[1 : bins + 1]
    # A constant tensor has width 0: every value equals every edge and lands in no bin -> entropy 0.
    p = counts.to(torch.float64) / flat.numel()
    terms = torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))
    return -terms.sum()


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
    values = torch.stack([entropy_tensor(t, bins).to(tensors[0].device) for t in tensors])
    return values.tolist()


def layer_l1(w: torch.Tensor) -> float:
    """The l1 norm of ``w`` (sum of absolute values), the alternative criterion of METHOD.md §9."""
    return float(w.detach().abs().sum(dtype=torch.float64).item())
