"""Tests for grafting.method.entropy against docs/METHOD.md §2, written from the description rather than the code.

The reference is the published computation, written out here:

- ``published_entropy`` (tests/helpers/published_code.py): the published per-bin loop word for word. Per bin a
  mask over the tensor, ``p = float32 count / n`` as a 0-dim tensor, ``H -= p * ln(p)`` in float32, bin
  0 first, empty bins skipped. (A constant tensor, which made the published function fail, gives 0.)
- ``float32_sum``: the same arithmetic started from bin counts worked out by hand.
- ``published_entropies``: the same loop run on a stack of same-sized tensors at once (each step of
  the loop applied to a batch of them), which is what makes 10,000 tensors affordable. That it equals
  the word-for-word loop is checked on a sample, and that a step on many values equals the same step
  on one value is checked exhaustively for every probability of real layer sizes.

Every comparison is exact: the project must give the published float32 value, because c = 500 turns a
last-bit difference into a different rounded coefficient now and then.
"""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch
from helpers import DEVICES
from helpers.published_code import published_entropy

from grafting.method import entropy as entropy_module
from grafting.method.entropy import entropy_tensor, entropy_tensors, l1_tensor, layer_entropies, layer_entropy, layer_l1
from grafting.method.weighting import graft_coefficient

LOW_PRECISION = (torch.float16, torch.bfloat16)
ALL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BINS = 10


def float32_sum(counts: list[int], numel: int, device: str | torch.device = "cpu") -> float:
    """The published arithmetic on bin counts: p = float32(count) / n, H -= p * ln(p), bin by bin."""
    entropy = torch.zeros((), dtype=torch.float32, device=device)
    for count in counts:
        if count:
            p = torch.tensor(float(count), dtype=torch.float32, device=device) / numel
            entropy -= p * torch.log(p)
    return float(entropy)


def float64_sum(counts: list[int], numel: int) -> float:
    """-sum p ln p in float64: the textbook value (and what the project computed before it matched the paper)."""
    return -sum((c / numel) * math.log(c / numel) for c in counts if c > 0)


def published_entropies(tensors: list[torch.Tensor], n: int = BINS) -> tuple[list[float], list[list[int]]]:
    """The published loop for many tensors, batched over tensors of one size and dtype; (values, bin counts)."""
    values: list[float] = [0.0] * len(tensors)
    counts: list[list[int]] = [[]] * len(tensors)
    groups: dict[tuple[int, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(t.numel(), t.dtype)].append(i)
    for (numel, _), members in groups.items():
        x = torch.stack([tensors[i].reshape(-1) for i in members])
        lo = x.min(dim=1, keepdim=True).values
        scale = (x.max(dim=1, keepdim=True).values - lo) / n
        entropy = torch.zeros(len(members), dtype=torch.float32, device=x.device)
        per_bin = []
        for i in range(n):
            in_bin = (x >= lo + i * scale) & (x < lo + (i + 1) * scale)
            p = torch.sum(in_bin, dim=1, dtype=torch.float) / numel
            filled = p != 0
            entropy = torch.where(filled, entropy - p * torch.log(torch.where(filled, p, 1.0)), entropy)
            per_bin.append(in_bin.sum(dim=1))
        for row, (value, bins) in enumerate(zip(entropy.tolist(), torch.stack(per_bin, dim=1).tolist())):
            values[members[row]], counts[members[row]] = value, bins
    return values, counts


# --- hand-computed cases -------------------------------------------------------------------------


def test_zero_to_nine_excludes_the_maximum() -> None:
    # lo=0, hi=9, width=0.9: 0..8 each sit alone in bins 0..8, 9 equals the last edge and counts in
    # no bin, so nine bins hold p = 1/10 each and the p's sum to 0.9.
    w = torch.arange(10, dtype=torch.float32)
    assert layer_entropy(w) == float32_sum([1] * 9, 10)
    assert layer_entropy(w) == pytest.approx(-9 * 0.1 * math.log(0.1), abs=1e-6)


def test_value_on_an_edge_goes_to_the_upper_bin() -> None:
    # [0, 9] gives width fl32(0.9); edge_3 = 0 + 3 * width is 2.6999998092651367 in float32.
    # Edge rule: 0 -> bin 0, 2.0 -> bin 2 ([1.8, 2.7)), 2.6999998 -> bin 3, 9 -> no bin: three
    # singletons of n = 4. Flooring (w - lo) / width would put 2.6999998 in bin 2 (p = 2/4) instead.
    on_edge = 2.6999998092651367
    w = torch.tensor([0.0, 2.0, on_edge, 9.0], dtype=torch.float32)
    width = (w.max() - w.min()) / 10
    assert (w.min() + 3 * width).item() == on_edge  # the value really sits on edge_3
    assert int(torch.floor((w[2] - w.min()) / width)) == 2  # and flooring disagrees with the edges
    assert layer_entropy(w) == float32_sum([1, 1, 1], 4)


def test_exactly_representable_edges() -> None:
    # lo=0, hi=10: width 1, edges 0, 1, ..., 10 exact. 1 and 1 sit on edge_1 -> bin 1; 2 on edge_2 ->
    # bin 2; 0 -> bin 0; 10 -> no bin. Counts 1, 2, 1 of n = 5.
    w = torch.tensor([1.0, 0.0, 10.0, 2.0, 1.0])
    assert layer_entropy(w) == float32_sum([1, 2, 1], 5)


@pytest.mark.parametrize("dtype", ALL_FLOATS)
def test_maximum_repeated_falls_in_no_bin(dtype: torch.dtype) -> None:
    # lo=0, hi=5, width 0.5 (exact in every dtype): 0 -> bin 0, 1 -> bin 2, 2 -> bin 4, the three 5s
    # in no bin. Three bins of p = 1/6: H = 0.5 ln 6, not the 3/6-heavy value counting the 5s would give.
    w = torch.tensor([5.0, 0.0, 5.0, 1.0, 2.0, 5.0], dtype=dtype)
    assert layer_entropy(w) == float32_sum([1, 1, 1], 6)
    assert layer_entropy(w) == pytest.approx(0.5 * math.log(6), abs=1e-6)


@pytest.mark.parametrize("dtype", ALL_FLOATS)
def test_constant_tensor_has_zero_entropy(dtype: torch.dtype) -> None:
    # Width 0: every value equals every edge and lands in no bin. (The published function failed here.)
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
    # Native dtype: half/bfloat16 put the middle value in bin 1 (two singletons); the float64 value
    # stays in bin 0 with 0 (one bin of 2/3). Float32 edges would give the other answer.
    expected = float32_sum([1, 1], 3) if on_edge else float32_sum([2], 3)
    assert on_edge == (dtype in LOW_PRECISION)
    assert layer_entropy(w) == expected
    assert layer_entropy(w.float()) != expected


def test_natural_logarithm_and_bin_count() -> None:
    # bins=4: width 1, 0..3 one per bin, 4 excluded: four bins of p = 1/5, H = 0.8 ln 5 (natural log).
    w = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    assert layer_entropy(w, bins=4) == float32_sum([1, 1, 1, 1], 5)
    assert layer_entropy(w, bins=4) == pytest.approx(0.8 * math.log(5), abs=1e-6)
    # Default 10 bins, width 0.4: 0, 1, 2, 3 still sit alone in their bins (0, 2, 5, 7).
    assert layer_entropy(w) == float32_sum([1, 0, 1, 0, 0, 1, 0, 1], 5)
    # bins=2, width 2: 0 and 1 share bin 0, 2 and 3 share bin 1: two bins of p = 2/5.
    assert layer_entropy(w, bins=2) == float32_sum([2, 2], 5)


def test_the_sum_runs_bin_by_bin_in_float32() -> None:
    # Counts 1, 1, 5, 3 of n = 11 in bins 0, 1, 2, 9 (the maximum 9 is in no bin).
    # Adding the same float32 terms in another order, or in float64, lands on a different last bit.
    w = torch.tensor([0.0, 1.0, 2.0, 2.1, 2.2, 2.3, 2.4, 8.3, 8.4, 8.5, 9.0])
    counts = [1, 1, 5, 0, 0, 0, 0, 0, 0, 3]
    assert layer_entropy(w) == float32_sum(counts, 11)
    assert float32_sum(counts, 11) != float32_sum(sorted(counts), 11)
    assert float32_sum(counts, 11) != float64_sum(counts, 11)


# --- against the published loop ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_FLOATS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_tensor_matches_published_loop(dtype: torch.dtype, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    w = (torch.randn(32, 16, 3, 3, generator=generator) * 0.1).to(dtype)
    assert layer_entropy(w) == published_entropy(w)


@pytest.mark.parametrize("dtype", ALL_FLOATS)
def test_quantised_tensor_matches_published_loop(dtype: torch.dtype) -> None:
    # Few distinct values, many of them on edges: the case where edge arithmetic matters most.
    generator = torch.Generator().manual_seed(7)
    w = (torch.randint(-13, 27, (4000,), generator=generator).to(torch.float64) / 8 + 0.1).to(dtype)
    assert layer_entropy(w) == published_entropy(w)
    assert layer_entropy(w, bins=7) == published_entropy(w, n=7)


def test_integer_tensor_is_accepted() -> None:
    w = torch.tensor([0, 1, 1, 2, 10])
    assert layer_entropy(w) == published_entropy(w)


def test_the_published_example_coefficient() -> None:
    # docs/METHOD.md §2: two MobileNetV2s seeded 1 and 2. For conv1.weight the published arithmetic
    # gives alpha = 0.40 (raw 0.404995); a float64 sum of the same bins gives 0.41 (raw 0.405001).
    from grafting.archs import cifar_models

    torch.manual_seed(1)
    own = cifar_models.create("mobilenetv2", 10).state_dict()["conv1.weight"]
    torch.manual_seed(2)
    peer = cifar_models.create("mobilenetv2", 10).state_dict()["conv1.weight"]
    h_own, h_peer = layer_entropy(own), layer_entropy(peer)
    assert (h_own, h_peer) == (published_entropy(own), published_entropy(peer))
    assert graft_coefficient(h_own, h_peer) == 0.40
    _, counts = published_entropies([own, peer])
    assert graft_coefficient(float64_sum(counts[0], own.numel()), float64_sum(counts[1], peer.numel())) == 0.41


# --- ten thousand tensors ------------------------------------------------------------------------

# Sizes of real layers (3x3 and 1x1 convs, depthwise, linear) and odd ones down to a single value.
SHAPES = [
    (16, 3, 3, 3),
    (16, 16, 3, 3),
    (32, 16, 3, 3),
    (64, 1, 3, 3),
    (24, 144, 1, 1),
    (10, 64),
    (96, 1, 3, 3),
    (1,),
    (2,),
    (3,),
    (7,),
    (31,),
    (100,),
    (257,),
    (1000,),
    (2049,),
]
# A few larger, with many values per bin.
LARGE_SHAPE, LARGE_PAIRS = (64, 64, 3, 3), 8
PAIRS = 5200


def _draw(kind: int, rows: int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """``rows`` tensors of ``shape`` (stacked) of one kind, each with its own scale."""
    scale = (torch.rand(rows, generator=generator) * 0.5 + 0.01).view(-1, *[1] * len(shape))
    size = (rows, *shape)
    if kind == 0:  # trained-looking weights
        return torch.randn(size, generator=generator) * scale
    if kind == 1:
        return (torch.rand(size, generator=generator) - 0.5) * scale
    if kind == 2:  # heavy tails: most values crowd a few bins
        return torch.randn(size, generator=generator) ** 3 * scale
    if kind == 3:  # few distinct values, many exactly on edges
        return torch.randint(-20, 21, size, generator=generator).float() / 8
    if kind == 4:  # a quarter of the values put exactly on edges 1..9, computed as the loop computes them
        flat = (torch.randn(size, generator=generator) * scale).view(rows, -1)
        lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
        width = (hi - lo) / BINS
        edges = lo + torch.randint(1, BINS, flat.shape, generator=generator) * width
        return torch.where(torch.rand(flat.shape, generator=generator) < 0.25, edges, flat).view(size)
    return scale.expand(size).clone()  # constant: entropy 0


KINDS = 6


def _pairs_of(kind: int, rows: int, shape: tuple[int, ...], generator: torch.Generator) -> list[torch.Tensor]:
    """``rows`` pairs of one kind and shape: every fourth partner is an independent draw, the others the
    first tensor plus noise of 1e-4 to 1e-2 of its scale, which moves a few values across bin edges:
    nearly equal entropies, where the coefficient is most sensitive to the last bit."""
    first = _draw(kind, rows, shape, generator)
    independent = _draw(kind, rows, shape, generator)
    nudge = 10 ** (torch.rand(rows, generator=generator) * 2 - 4) * first.flatten(1).std(dim=1, correction=0)
    nudged = first + torch.randn(first.shape, generator=generator) * nudge.view(-1, *[1] * len(shape))
    alternate = (torch.arange(rows) % 4 == 0).view(-1, *[1] * len(shape))
    second = torch.where(alternate, independent, nudged)
    return [t for pair in zip(first, second) for t in pair]


def random_pairs(count: int = PAIRS) -> list[torch.Tensor]:
    """At least 2 * ``count`` tensors of every kind and shape, consecutive ones a pair like one layer of
    two networks. Every 25th pair is in another float dtype (edges in that dtype, p still float32)."""
    generator = torch.Generator().manual_seed(14)
    rows = -(-count // (len(SHAPES) * KINDS))
    tensors = [t for shape in SHAPES for kind in range(KINDS) for t in _pairs_of(kind, rows, shape, generator)]
    tensors += _pairs_of(0, LARGE_PAIRS, LARGE_SHAPE, generator)
    for i in range(0, len(tensors), 50):
        dtype = (torch.float64, torch.float16, torch.bfloat16)[i // 50 % 3]
        tensors[i], tensors[i + 1] = tensors[i].to(dtype), tensors[i + 1].to(dtype)
    return tensors


@pytest.fixture(scope="module")
def ten_thousand() -> tuple[list[torch.Tensor], list[float], list[list[int]]]:
    """The tensors of :func:`random_pairs`, their published entropies and bin counts (CPU)."""
    tensors = random_pairs()
    return (tensors, *published_entropies(tensors))


def _coefficients(values: list[float]) -> list[float]:
    return [graft_coefficient(values[i], values[i + 1]) for i in range(0, len(values), 2)]


@pytest.mark.parametrize("device", DEVICES)
def test_ten_thousand_tensors_give_the_published_float32_values(
    device: str, ten_thousand: tuple[list[torch.Tensor], list[float], list[list[int]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu_tensors, cpu_expected, counts = ten_thousand
    tensors = [t.to(device) for t in cpu_tensors]
    assert len(tensors) >= 10_000 and sum(not any(c) for c in counts) > 100  # constant tensors included
    expected = cpu_expected if device == "cpu" else published_entropies(tensors)[0]
    for i in range(0, len(tensors), 101):  # the batched loop is the published one, word for word
        assert expected[i] == published_entropy(tensors[i]), i

    values = layer_entropies(tensors)
    assert values == expected
    assert [layer_entropy(t) for t in tensors[::20]] == expected[::20]
    assert [float(entropy_tensor(t)) for t in tensors[1::20]] == expected[1::20]
    monkeypatch.setattr(entropy_module, "HOST_COUNTED", ())  # a GPU's stacked searches, for every size
    monkeypatch.setattr(entropy_module, "_BATCH_ELEMENTS", 1 << 14)  # and many batches per size
    assert entropy_tensors(tensors).tolist() == expected

    # Zero coefficient differences. The comparison is at the last bit: the float64 sum of the same bins
    # (the project's arithmetic before) differs from nearly every value, and flips a coefficient of
    # similar layers a few times in 10,000 (test_the_published_example_coefficient shows one).
    assert _coefficients(values) == _coefficients(expected)
    textbook = [float64_sum(c, t.numel()) for c, t in zip(counts, tensors)]
    filled = [i for i, c in enumerate(counts) if sum(map(bool, c)) > 1]
    assert sum(textbook[i] != expected[i] for i in filled) > 0.9 * len(filled)


@pytest.mark.parametrize("device", DEVICES)
def test_every_probability_of_real_layer_sizes(device: str) -> None:
    # Exhaustive over the counts 1..n for the sizes of real layers: each row has one filled bin, so
    # the table gives -p ln p for every p = c / n the published loop can meet at that size, and each
    # must be what the step-by-step 0-dim arithmetic gives.
    for numel in (27, 144, 432, 576, 1152, 2304, 4608):
        counts = torch.zeros(numel, BINS, dtype=torch.int64, device=device)
        counts[:, 3] = torch.arange(1, numel + 1, device=device)
        table = entropy_module._entropies(entropy_module._probabilities(counts, numel)).tolist()
        assert table == [float32_sum([c], numel, device) for c in range(1, numel + 1)], numel


def test_layer_entropies_equals_layer_entropy_per_tensor() -> None:
    generator = torch.Generator().manual_seed(3)
    tensors = [
        torch.randn(16, 3, 3, 3, generator=generator),
        torch.randn(10, 64, generator=generator).to(torch.float64),
        torch.full((5,), 2.0),
        torch.randn(100, generator=generator).to(torch.float16),
        torch.arange(10, dtype=torch.float32),
        torch.empty(0),
    ]
    values = layer_entropies(tensors)
    assert isinstance(values, list) and all(isinstance(v, float) for v in values)
    assert values == [layer_entropy(t) for t in tensors]
    assert values[-1] == 0.0
    assert layer_entropies([]) == []


def test_layer_l1_is_the_published_float32_norm() -> None:
    w = torch.tensor([[-1.5, 2.0], [0.25, -0.25]])
    assert layer_l1(w) == 4.0
    assert isinstance(layer_l1(w), float)
    generator = torch.Generator().manual_seed(4)
    w = torch.randn(64, 32, 3, 3, generator=generator)
    assert layer_l1(w) == float(torch.norm(w, p=1))  # the published call, float32
    assert layer_l1(w.to(memory_format=torch.channels_last)) == layer_l1(w)  # summed in the standard order
    assert l1_tensor(w).dtype == torch.float64


# --- host synchronisation ------------------------------------------------------------------------

# Python-level ways a tensor's value reaches the host.
SYNC_METHODS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__")


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every call of a Tensor method that copies a value to the host, on a GPU's path (on the CPU
    numpy counts the bins, which reads CPU tensors as numpy arrays: no synchronisation there)."""
    monkeypatch.setattr(entropy_module, "HOST_COUNTED", ())
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
    layer_entropies([torch.randn(8, 4, 3, 3) for _ in range(6)] + [torch.randn(20000), torch.randn(7)])
    assert len(host_reads) == 1


def test_entropy_tensor_needs_no_values_on_the_host() -> None:
    # Meta tensors carry shapes but no data: an op that must look at the values to size its output
    # (bincount, nonzero, .item()) cannot run on them. On CUDA those are exactly the ops that stall
    # the host, so running on "meta" proves entropy_tensor is free of hidden synchronisations.
    h = entropy_tensor(torch.empty(64, 32, 3, 3, device="meta"))
    assert h.device.type == "meta" and h.shape == () and h.dtype == torch.float64
    hs = entropy_tensors(
        [torch.empty(8, 3, device="meta"), torch.empty(8, 3, device="meta"), torch.empty(5, device="meta")]
    )
    assert hs.device.type == "meta" and hs.shape == (3,)
