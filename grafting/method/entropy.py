"""Layer information (docs/METHOD.md §2 and §9): the entropy of a weight histogram, and the l1 norm.

The entropy is what the arctan weighting multiplies by c = 500, so it must be the published code's
value to the last bit, not merely close to it:

- bin membership: half-open bins ``[edge_k, edge_k+1)`` against the explicit edge vector
  ``lo + k * width`` computed in the tensor's own dtype; values equal to the last edge (normally the
  maximum) fall in no bin. On a GPU, ``torch.bucketize`` against that edge vector makes the same
  comparisons as the per-bin loop, in one pass; tensors of one size are searched together
  (``torch.searchsorted``, one row of edges each). On the CPU a binary search per value is slow (about
  14 ns), so there numpy counts the values at or above each edge (one vectorised comparison per edge,
  about 1 ns per value for all of them) and a bin holds the difference of two such counts: the same
  comparisons, since the edges of a finite tensor never decrease (other tensors count the published
  two-sided test bin by bin).
- arithmetic: ``p_k = float32(count_k) / n`` and ``H -= p_k * ln(p_k)`` in float32, bin 0 first,
  empty bins skipped. The counts of all tensors form a rows x bins table and every step is one
  elementwise operation on it, the same operation (with the same operands) the published loop applies
  to a single value, so each row comes out bit for bit as the loop's result. Summing in float64 instead
  moves the value by ~1e-8, which flips a rounded coefficient about once in 10,000 comparisons.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["entropy_tensor", "entropy_tensors", "layer_entropy", "layer_entropies", "l1_tensor", "layer_l1"]


def _probabilities(counts: torch.Tensor, numel: int) -> torch.Tensor:
    """The published p of every bin: the float32 count divided by the Python int ``numel``.

    The very same operation as the published ``torch.sum(mask, dtype=torch.float) / len(x)``, so every
    device rounds it as the published code did there (on CUDA PyTorch multiplies by the float32
    reciprocal of ``numel`` rather than dividing; same call, same result).
    """
    return counts.to(torch.float32) / numel


def _entropies(p: torch.Tensor) -> torch.Tensor:
    """Entropy of every row of a probability table (rows x bins) as the published loop summed it, as float64.

    One code path for one or many tensors, so a batched value is bit for bit the single one.
    """
    # p * ln(p) for the filled bins; an empty bin gives 0 * ln(1) = 0, which leaves the sum unchanged,
    # exactly as skipping it does (0 * ln(0) would be NaN).
    terms = p * torch.log(torch.where(p > 0, p, 1.0))
    # float32 addition is not associative: subtract bin by bin, bin 0 first, as the loop did. A loop
    # over the table's columns (10 small kernels for any number of tensors), not over the data.
    entropy = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
    for k in range(p.shape[1]):
        entropy = entropy - terms[:, k]
    # The published code handed its float32 on as a Python float; float64 holds it exactly.
    return entropy.to(torch.float64)


def _as_float(w: torch.Tensor) -> torch.Tensor:
    return w.detach() if torch.is_floating_point(w) else w.detach().float()


def _bin_counts(flat: torch.Tensor, bins: int) -> torch.Tensor:
    """The bin counts of a non-empty 1-D tensor, as a 1 x ``bins`` int64 table."""
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
    ones = torch.ones((), dtype=torch.int64, device=flat.device).expand_as(index)  # a view, no n-sized fill
    # A constant tensor has width 0: every value equals every edge and lands in no bin -> entropy 0.
    return counts.scatter_add_(0, index, ones)[None, 1 : bins + 1]


def _row_bin_counts(rows: torch.Tensor, bins: int) -> torch.Tensor:
    """:func:`_bin_counts` of every row of a 2-D tensor at once: the same edges, comparisons and counts."""
    lo, hi = torch.aminmax(rows, dim=1)
    width = (hi - lo) / bins
    edges = lo[:, None] + torch.arange(bins + 1, device=rows.device, dtype=rows.dtype) * width[:, None]
    index = torch.searchsorted(edges, rows, right=True)  # each row against its own edges
    counts = torch.zeros(rows.shape[0], bins + 2, dtype=torch.int64, device=rows.device)
    ones = torch.ones((), dtype=torch.int64, device=rows.device).expand_as(index)
    return counts.scatter_add_(1, index, ones)[:, 1 : bins + 1]


def _host_bin_counts(flats: Sequence[torch.Tensor], bins: int) -> torch.Tensor:
    """:func:`_bin_counts` of CPU tensors of one size and dtype as a rows x ``bins`` int64 table, counted
    with numpy: the same edges (computed by torch in the tensors' dtype, all rows at once) and the
    same comparisons. float16 and bfloat16 values and edges are compared as float32, which holds them
    exactly."""
    extremes = [torch.aminmax(flat) for flat in flats]
    lo = torch.stack([low for low, _ in extremes])
    hi = torch.stack([high for _, high in extremes])
    width = (hi - lo) / bins
    edges = lo[:, None] + torch.arange(bins + 1, dtype=lo.dtype) * width[:, None]
    exact = torch.float32 if lo.dtype in (torch.float16, torch.bfloat16) else lo.dtype
    edge_rows = edges.to(exact).numpy()
    counts = np.empty((len(flats), bins), dtype=np.int64)
    for row, flat in enumerate(flats):
        values, edge = flat.to(exact).numpy(), edge_rows[row]
        if np.isfinite(edge).all():  # non-decreasing: bin k = (at or above edge k) - (at or above edge k+1)
            at_least = np.array([np.count_nonzero(values >= e) for e in edge])
            counts[row] = at_least[:-1] - at_least[1:]
        else:  # NaN or infinite values: the published test, bin by bin
            counts[row] = [np.count_nonzero((values >= edge[k]) & (values < edge[k + 1])) for k in range(bins)]
    return torch.from_numpy(counts)


# Device types whose bins numpy counts (:func:`_host_bin_counts`); the others use torch's searches.
HOST_COUNTED = ("cpu",)


def _counts(flats: Sequence[torch.Tensor], bins: int) -> torch.Tensor:
    """The bin counts of non-empty 1-D tensors of one size, dtype and device, as a rows x ``bins`` table."""
    if flats[0].device.type in HOST_COUNTED:
        return _host_bin_counts(flats, bins)
    if len(flats) == 1:  # the 1-D search is the faster kernel
        return _bin_counts(flats[0], bins)
    return _row_bin_counts(torch.stack(list(flats)), bins)


def entropy_tensor(w: torch.Tensor, bins: int = 10) -> torch.Tensor:
    """Entropy of ``w``'s value histogram as a 0-dim float64 tensor on ``w``'s device (no host sync).

    The value is the published float32 result (docs/METHOD.md §2), held exactly in float64. Use this
    to compute many entropies and synchronise once; :func:`layer_entropy` wraps it.
    """
    flat = _as_float(w).reshape(-1)
    if flat.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=w.device)
    return _entropies(_probabilities(_counts([flat], bins), flat.numel()))[0]


# Elements stacked into one batch of :func:`entropy_tensors`: bounds the int64 bin index to 256 MiB.
_BATCH_ELEMENTS = 1 << 25


def entropy_tensors(tensors: Sequence[torch.Tensor], bins: int = 10) -> torch.Tensor:
    """Entropies of many tensors as one float64 vector on the first tensor's device (no host sync).

    Tensors of equal size, dtype and device are binned together (on a GPU stacked into one search),
    and the probabilities of all of them go through the float32 summation as one table, so a whole
    network costs a few dozen kernels rather than about thirty per tensor, which is what dominates on
    a GPU. Every value is the one :func:`entropy_tensor` gives for that tensor alone.
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    flats = [_as_float(t).reshape(-1) for t in tensors]
    groups: dict[tuple[int, torch.dtype, torch.device], list[int]] = {}
    for i, flat in enumerate(flats):
        groups.setdefault((flat.numel(), flat.dtype, flat.device), []).append(i)
    device = tensors[0].device
    tables: list[torch.Tensor] = []  # probability rows, of the tensors listed in `order`
    order: list[int] = []
    for (numel, _, _), members in groups.items():
        if numel == 0:  # no values: an all-zero row, entropy 0
            tables.append(torch.zeros(len(members), bins, dtype=torch.float32, device=device))
            order += members
            continue
        per_batch = max(1, _BATCH_ELEMENTS // numel)
        for first in range(0, len(members), per_batch):
            batch = members[first : first + per_batch]
            counts = _counts([flats[i] for i in batch], bins)
            tables.append(_probabilities(counts, numel).to(device))
            order += batch
    entropies = _entropies(torch.cat(tables))
    row_of = [0] * len(order)
    for row, i in enumerate(order):
        row_of[i] = row
    return entropies[_index_on(device, row_of)]


def _index_on(device: torch.device, values: list[int]) -> torch.Tensor:
    """An int64 index on ``device`` without a host synchronisation: a pageable host-to-GPU copy waits
    for the device, one from pinned memory does not."""
    index = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return index.pin_memory().to(device, non_blocking=True)
    return index.to(device)


def layer_entropy(w: torch.Tensor, bins: int = 10) -> float:
    """Entropy (natural log) of the histogram of ``w``'s values with ``bins`` equal-width bins.

    Exactly docs/METHOD.md §2: bins ``[lo + k*width, lo + (k+1)*width)``, the maximum in no bin, a constant
    tensor gives 0. Works on CPU and CUDA tensors of any float dtype with one host synchronisation.
    The probabilities and the sum are float32, bin by bin, as in the published code.
    """
    return float(entropy_tensor(w, bins).item())


def layer_entropies(tensors: list[torch.Tensor], bins: int = 10) -> list[float]:
    """Entropies of many tensors with a single host synchronisation (grafting a whole model)."""
    if not tensors:
        return []
    return entropy_tensors(tensors, bins).tolist()


def l1_tensor(w: torch.Tensor) -> torch.Tensor:
    """The l1 norm of ``w`` as a 0-dim float64 tensor on ``w``'s device (no host sync).

    Computed as the published l1 criterion did (``torch.norm(u, p=1)``): a float32 reduction for float32
    weights, over the standard (contiguous) layout whatever ``w``'s memory format, widened to float64.
    """
    return torch.linalg.vector_norm(_as_float(w).contiguous(), ord=1).to(torch.float64)


def layer_l1(w: torch.Tensor) -> float:
    """The l1 norm of ``w`` (sum of absolute values), the alternative criterion of docs/METHOD.md §9."""
    return float(l1_tensor(w).item())
