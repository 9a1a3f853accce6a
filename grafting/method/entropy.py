"""Layer information (docs/METHOD.md §2 and §9): the entropy of a weight histogram, and the l1 norm.

The entropy is what the arctan weighting multiplies by c = 500, so bin membership must match
the published code exactly: the bins are half-open, ``[edge_k, edge_k+1)``, against the explicit
edge vector ``lo + k * width`` computed in the tensor's own dtype, and values equal to the last
edge (normally the maximum) fall in no bin. ``torch.bucketize`` against that edge vector makes the
same comparisons as the original per-bin loop, in one pass and without leaving the device; tensors
of one size are searched together (``torch.searchsorted``, one row of edges each), which gives the
same bins with far fewer kernels.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["entropy_tensor", "entropy_tensors", "layer_entropy", "layer_entropies", "layer_l1"]


def _entropy_from_counts(counts: torch.Tensor, numel: int) -> torch.Tensor:
    """Entropy of every row of bin counts (rows x bins) as float64; one code path for one or many tensors,
    so a batched value is bit for bit the single one."""
    # entr(p) = -p ln p, and 0 where p = 0: empty bins contribute nothing.
    return torch.special.entr(counts.to(torch.float64) / numel).sum(dim=1)


def _as_float(w: torch.Tensor) -> torch.Tensor:
    return w.detach() if torch.is_floating_point(w) else w.detach().float()


def _bin_width(lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
    """``(hi - lo) / bins`` as a true division on every device. CUDA divides by a Python number as a
    multiplication by its reciprocal, one rounding off for about a third of all ranges, which moves every
    edge and the values on it; dividing by a tensor on the device keeps the CPU's edges."""
    return (hi - lo) / torch.full((), bins, dtype=hi.dtype, device=hi.device)


def entropy_tensor(w: torch.Tensor, bins: int = 10) -> torch.Tensor:
    """Entropy of ``w``'s value histogram as a 0-dim float64 tensor on ``w``'s device (no host sync).

    Use this to compute many entropies and synchronise once; :func:`layer_entropy` wraps it.
    """
    flat = _as_float(w).reshape(-1)
    if flat.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=w.device)
    lo, hi = torch.aminmax(flat)
    width = _bin_width(lo, hi, bins)
    # Edges in w's dtype, as the published loop computed them: lo + k * width.
    edges = lo + torch.arange(bins + 1, device=flat.device, dtype=flat.dtype) * width
    # right=True: index i means edges[i-1] <= v < edges[i]; bins 1..bins are the real ones,
    # 0 is below the first edge and bins+1 is at or above the last (the excluded maximum).
    index = torch.bucketize(flat, edges, right=True)
    # A fixed-size scatter_add_, not bincount: on CUDA bincount reads the index's min and max back to
    # the host to size its output, two hidden synchronisations per tensor.
    counts = torch.zeros(bins + 2, dtype=torch.int64, device=flat.device)
    ones = torch.ones((), dtype=torch.int64, device=flat.device).expand_as(index)  # a view, no n-sized fill
    counts = counts.scatter_add_(0, index, ones)[1 : bins + 1]
    # A constant tensor has width 0: every value equals every edge and lands in no bin -> entropy 0.
    return _entropy_from_counts(counts[None], flat.numel())[0]


def _row_entropies(rows: torch.Tensor, bins: int) -> torch.Tensor:
    """:func:`entropy_tensor` of every row of a 2-D tensor at once: the same edges, comparisons and counts."""
    lo, hi = torch.aminmax(rows, dim=1)
    width = _bin_width(lo, hi, bins)
    edges = lo[:, None] + torch.arange(bins + 1, device=rows.device, dtype=rows.dtype) * width[:, None]
    index = torch.searchsorted(edges, rows, right=True)  # each row against its own edges
    counts = torch.zeros(rows.shape[0], bins + 2, dtype=torch.int64, device=rows.device)
    ones = torch.ones((), dtype=torch.int64, device=rows.device).expand_as(index)
    counts = counts.scatter_add_(1, index, ones)[:, 1 : bins + 1]
    return _entropy_from_counts(counts, rows.shape[1])


# Elements stacked into one batch of :func:`entropy_tensors`: bounds the int64 bin index to 256 MiB.
_BATCH_ELEMENTS = 1 << 25
# On the CPU the per-row search costs ~1.5x the 1-D one per value, so only tensors small enough for the
# per-call overhead to dominate are stacked there (measured crossover ~10 k values); GPUs stack all.
_CPU_BATCH_MAX_NUMEL = 8192


def entropy_tensors(tensors: Sequence[torch.Tensor], bins: int = 10) -> torch.Tensor:
    """Entropies of many tensors as one float64 vector on the first tensor's device (no host sync).

    Tensors of equal size, dtype and device are stacked and binned together, so a whole network
    costs a few dozen kernels rather than about twenty per tensor, which is what dominates on a GPU
    (on the CPU only small tensors are stacked). Every value is the one :func:`entropy_tensor` gives
    for that tensor alone.
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    flats = [_as_float(t).reshape(-1) for t in tensors]
    groups: dict[tuple[int, torch.dtype, torch.device], list[int]] = {}
    for i, flat in enumerate(flats):
        groups.setdefault((flat.numel(), flat.dtype, flat.device), []).append(i)
    device = tensors[0].device
    values: list[torch.Tensor | None] = [None] * len(flats)
    for (numel, _, group_device), members in groups.items():
        if numel == 0:
            for i in members:
                values[i] = torch.zeros((), dtype=torch.float64, device=device)
            continue
        alone = group_device.type == "cpu" and numel > _CPU_BATCH_MAX_NUMEL
        per_batch = 1 if alone else max(1, _BATCH_ELEMENTS // numel)
        for first in range(0, len(members), per_batch):
            batch = members[first : first + per_batch]
            if len(batch) == 1:  # the 1-D search is the faster kernel
                values[batch[0]] = entropy_tensor(flats[batch[0]], bins).to(device)
                continue
            rows = _row_entropies(torch.stack([flats[i] for i in batch]), bins).to(device)
            for row, i in enumerate(batch):
                values[i] = rows[row]
    return torch.stack(values)  # type: ignore[arg-type]


def layer_entropy(w: torch.Tensor, bins: int = 10) -> float:
    """Entropy (natural log) of the histogram of ``w``'s values with ``bins`` equal-width bins.

    Exactly docs/METHOD.md §2: bins ``[lo + k*width, lo + (k+1)*width)``, the maximum in no bin, a constant
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
    """The l1 norm of ``w`` (sum of absolute values), the alternative criterion of docs/METHOD.md §9."""
    return float(w.detach().abs().sum(dtype=torch.float64).item())
