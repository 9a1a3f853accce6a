"""Tests for grafting.entropy against METHOD.md §2, written from the spec rather than the code.

Expected entropies are either worked out by hand (the comments show the bins) or computed by a
deliberately naive per-bin loop that follows the spec's formula literally.
"""
import math

import pytest
import torch

from grafting.method.entropy import entropy_tensor, layer_entropies, layer_entropy, layer_l1

LOW_PRECISION = (torch.float16, torch.bfloat16)
ALL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def entropy_of_counts(counts: list[int], n: int) -> float:
    """-sum p ln p over the non-empty bins, p = count / n, in float64."""
    return -sum((c / n) * math.log(c / n) for c in counts if c > 0)


def naive_entropy(w: torch.Tensor, bins: int = 10) -> float:
    """METHOD.md §2 word for word: one pass over the tensor per bin, edges lo + k*width in w's dtype."""
    flat = w.reshape(-1)
    lo, hi = flat.min(), flat.max()
    width = (hi - lo) / bins  # stays in w's dtype
    counts = []
    for k in range(bins):
        left = lo + k * width
        right = lo + (k + 1) * width
        counts.append(int(((flat >= left) & (flat < right)).sum()))
    return entropy_of_counts(counts, flat.numel())


# --- hand-computed cases -------------------------------------------------------------------------


def test_zero_to_nine_excludes_the_maximum() -> None:
    # lo=0, hi=9, width=0.9: 0..8 each sit alone in bins 0..8, 9 equals the last edge and counts in
    # no bin, so nine bins hold p = 1/10 each and the p's sum to 0.9.
    w = torch.arange(10, dtype=torch.float32)
    assert layer_entropy(w) == pytest.approx(-9 * 0.1 * math.log(0.1), abs=1e-12)


def test_value_on_an_edge_goes_to_the_upper_bin() -> None:
    # [0, 9] gives width fl32(0.9); edge_3 = 0 + 3 * width is 2.6999998092651367 in float32.
    # Edge rule: 0 -> bin 0, 2.0 -> bin 2 ([1.8, 2.7)), 2.6999998 -> bin 3, 9 -> no bin: three
    # singletons of n = 4. Flooring (w - lo) / width would put 2.6999998 in bin 2 (p = 2/4) instead.
    on_edge = 2.6999998092651367
    w = torch.tensor([0.0, 2.0, on_edge, 9.0], dtype=torch.float32)
    width = (w.max() - w.min()) / 10
    assert (w.min() + 3 * width).item() == on_edge  # the value really sits on edge_3
    assert int(torch.floor((w[2] - w.min()) / width)) == 2  # and flooring disagrees with the edges
    assert layer_entropy(w) == pytest.approx(entropy_of_counts([1, 1, 1], 4), abs=1e-12)


def test_exactly_representable_edges() -> None:
    # lo=0, hi=10: width 1, edges 0, 1, ..., 10 exact. 1 and 1 sit on edge_1 -> bin 1; 2 on edge_2 ->
    # bin 2; 0 -> bin 0; 10 -> no bin. Counts 1, 2, 1 of n = 5.
    w = torch.tensor([1.0, 0.0, 10.0, 2.0, 1.0])
    assert layer_entropy(w) == pytest.approx(entropy_of_counts([1, 2, 1], 5), abs=1e-12)


@pytest.mark.parametrize("dtype", ALL_FLOATS)
def test_maximum_repeated_falls_in_no_bin(dtype: torch.dtype) -> None:
    # lo=0, hi=5, width 0.5 (exact in every dtype): 0 -> bin 0, 1 -> bin 2, 2 -> bin 4, the three 5s
    # in no bin. Three bins of p = 1/6: H = 0.5 ln 6, not the 3/6-heavy value counting the 5s would give.
    w = torch.tensor([5.0, 0.0, 5.0, 1.0, 2.0, 5.0], dtype=dtype)
    assert layer_entropy(w) == pytest.approx(0.5 * math.log(6), abs=1e-12)


@pytest.mark.parametrize("dtype", ALL_FLOATS)
def test_constant_tensor_has_zero_entropy(dtype: torch.dtype) -> None:
    assert layer_entropy(torch.full((7, 3), 0.25, dtype=dtype)) == 0.0
    assert layer_entropy(torch.zeros(4, dtype=dtype)) == 0.0
    assert layer_entropy(torch.tensor([3.0], dtype=dtype)) == 0.0


@pytest.mark.parametrize(
    "dtype, near_edge",
    [
        # fl16(0.9) = 0.89990234375 is exactly edge_1 = fl16(fl16(9 - 0) / 10) in half precision.
        (torch.float16, 0.9),
        # bf16(0.9) = 0.8984375 is exactly edge_1 in bfloat16.
        (torch.bfloat16, 0.9),
        # Just below edge_1 = 0.9 in float64; rounding the tensor to float32 would lift it onto the edge.
        (torch.float64, 0.9 - 1e-12),
    ],
)
def test_edges_are_computed_in_the_tensors_dtype(dtype: torch.dtype, near_edge: float) -> None:
    w = torch.tensor([0.0, near_edge, 9.0], dtype=dtype)
    lo, width = w.min(), (w.max() - w.min()) / 10
    on_edge = bool(w[1] >= lo + width)  # decided in the tensor's dtype
    # Native dtype: half/bfloat16 put the middle value in bin 1 (two singletons, H = 2/3 ln 3); the
    # float64 value stays in bin 0 with 0 (one bin of 2/3). Float32 edges would give the other answer.
    expected = entropy_of_counts([1, 1], 3) if on_edge else entropy_of_counts([2], 3)
    assert on_edge == (dtype in LOW_PRECISION)
    assert layer_entropy(w) == pytest.approx(expected, abs=1e-12)
    assert layer_entropy(w.float()) != pytest.approx(expected, abs=1e-6)


def test_natural_logarithm_and_bin_count() -> None:
    # bins=4: width 1, 0..3 one per bin, 4 excluded: four bins of p = 1/5, H = 0.8 ln 5 (natural log).
    w = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    assert layer_entropy(w, bins=4) == pytest.approx(0.8 * math.log(5), abs=1e-12)
    # Default 10 bins, width 0.4: 0, 1, 2, 3 still sit alone in their bins (0, 2, 5, 7).
    assert layer_entropy(w) == pytest.approx(0.8 * math.log(5), abs=1e-12)
    # bins=2, width 2: 0 and 1 share bin 0, 2 and 3 share bin 1: two bins of p = 2/5.
    assert layer_entropy(w, bins=2) == pytest.approx(entropy_of_counts([2, 2], 5), abs=1e-12)


# --- against the naive loop ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_FLOATS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_tensor_matches_naive_loop(dtype: torch.dtype, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    w = (torch.randn(32, 16, 3, 3, generator=generator) * 0.1).to(dtype)
    assert layer_entropy(w) == pytest.approx(naive_entropy(w), abs=1e-9)


@pytest.mark.parametrize("dtype", ALL_FLOATS)
def test_quantised_tensor_matches_naive_loop(dtype: torch.dtype) -> None:
    # Few distinct values, many of them on edges: the case where edge arithmetic matters most.
    generator = torch.Generator().manual_seed(7)
    w = (torch.randint(-13, 27, (4000,), generator=generator).to(torch.float64) / 8 + 0.1).to(dtype)
    assert layer_entropy(w) == pytest.approx(naive_entropy(w), abs=1e-9)
    assert layer_entropy(w, bins=7) == pytest.approx(naive_entropy(w, bins=7), abs=1e-9)


def test_integer_tensor_is_accepted() -> None:
    w = torch.tensor([0, 1, 1, 2, 10])
    assert layer_entropy(w) == pytest.approx(naive_entropy(w.float()), abs=1e-12)


def test_layer_entropies_equals_layer_entropy_per_tensor() -> None:
    generator = torch.Generator().manual_seed(3)
    tensors = [
        torch.randn(16, 3, 3, 3, generator=generator),
        torch.randn(10, 64, generator=generator).to(torch.float64),
        torch.full((5,), 2.0),
        torch.randn(100, generator=generator).to(torch.float16),
        torch.arange(10, dtype=torch.float32),
    ]
    values = layer_entropies(tensors)
    assert isinstance(values, list) and all(isinstance(v, float) for v in values)
    assert values == [layer_entropy(t) for t in tensors]
    assert layer_entropies([]) == []


def test_layer_l1_is_sum_of_absolute_values() -> None:
    w = torch.tensor([[-1.5, 2.0], [0.25, -0.25]])
    assert layer_l1(w) == 4.0
    assert isinstance(layer_l1(w), float)


# --- host synchronisation ------------------------------------------------------------------------

# Python-level ways a tensor's value reaches the host.
SYNC_METHODS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__")


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every call of a Tensor method that copies a value to the host."""
    calls: list[str] = []
    for name in SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return calls


def test_entropy_tensor_reads_nothing_back(host_reads: list[str]) -> None:
    w = torch.randn(64, 32, 3, 3)
    h = entropy_tensor(w)
    assert host_reads == []
    assert isinstance(h, torch.Tensor) and h.dim() == 0 and h.dtype == torch.float64


def test_layer_entropy_reads_back_once(host_reads: list[str]) -> None:
    layer_entropy(torch.randn(64, 32, 3, 3))
    assert len(host_reads) == 1


def test_layer_entropies_reads_back_once_for_all(host_reads: list[str]) -> None:
    layer_entropies([torch.randn(8, 4, 3, 3) for _ in range(6)])
    assert len(host_reads) == 1


def test_entropy_tensor_needs_no_values_on_the_host() -> None:
    # Meta tensors carry shapes but no data: an op that must look at the values to size its output
    # (bincount, nonzero, .item()) cannot run on them. On CUDA those are exactly the ops that stall
    # the host, so running on "meta" proves entropy_tensor is free of hidden synchronisations.
    h = entropy_tensor(torch.empty(64, 32, 3, 3, device="meta"))
    assert h.device.type == "meta" and h.shape == () and h.dtype == torch.float64
