"""Tests for grafting.weighting.graft_coefficient against docs/METHOD.md §3."""

import math
import random

import pytest
from helpers.published_code import published_coefficient

from grafting.method.weighting import graft_coefficient


def is_two_decimals(x: float) -> bool:
    """True when x is the float nearest to some k / 100."""
    return x == round(x * 100) / 100 and abs(x * 100 - round(x * 100)) < 1e-9


def test_equal_information_gives_one_half() -> None:
    for h in (0.0, 0.5, 1.7, 2.3):
        assert graft_coefficient(h, h) == 0.5
        assert graft_coefficient(h, h, a=0.9, c=3.0) == 0.5


@pytest.mark.parametrize("a", [0.2, 0.4, 0.6, 1.0])
def test_large_difference_saturates_at_half_plus_a_over_two(a: float) -> None:
    # arctan(500 * 2) is within 1e-3 of pi / 2, so alpha rounds to 0.5 +- a/2.
    assert graft_coefficient(2.2, 0.2, a=a) == round(0.5 + a / 2, 2)
    assert graft_coefficient(0.2, 2.2, a=a) == round(0.5 - a / 2, 2)


def test_defaults_are_a_04_and_c_500() -> None:
    # d = 0.001: (0.4 / pi) * arctan(0.5) + 0.5 = 0.559034... -> 0.56 with c = 500; c = 1 gives 0.50.
    assert graft_coefficient(1.001, 1.0) == 0.56
    assert graft_coefficient(1.001, 1.0, c=1.0) == 0.5
    # a = 0.8 doubles the swing: 0.5 + (0.8 / pi) * arctan(0.5) = 0.618... -> 0.62.
    assert graft_coefficient(1.001, 1.0, a=0.8) == 0.62


def test_a_zero_is_plain_averaging() -> None:
    rng = random.Random(0)
    for _ in range(200):
        assert graft_coefficient(rng.uniform(0, 3), rng.uniform(0, 3), a=0.0, c=rng.choice([1.0, 500.0])) == 0.5


def test_more_information_keeps_more() -> None:
    assert graft_coefficient(1.1, 1.0) > 0.5
    assert graft_coefficient(1.0, 1.1) < 0.5
    # Monotone in the difference.
    alphas = [graft_coefficient(1.0 + d, 1.0, c=50.0) for d in (-0.1, -0.01, -0.001, 0.0, 0.001, 0.01, 0.1)]
    assert alphas == sorted(alphas)


def test_matches_formula_rounded_to_two_decimals() -> None:
    rng = random.Random(1)
    for _ in range(2000):
        h1, h2 = rng.uniform(0, 2.3), rng.uniform(0, 2.3)
        a, c = rng.choice([0.2, 0.4, 1.0]), rng.choice([1.0, 10.0, 100.0, 500.0])
        raw = (a / math.pi) * math.atan(c * (h1 - h2)) + 0.5
        alpha = graft_coefficient(h1, h2, a=a, c=c)
        assert is_two_decimals(alpha)
        assert abs(alpha - raw) <= 0.005 + 1e-12


def test_symmetry_over_random_pairs() -> None:
    rng = random.Random(2)
    for _ in range(5000):
        # Entropy-sized values, differences mostly small enough that c = 500 does not saturate.
        h1 = rng.uniform(1.0, 2.3)
        h2 = h1 + rng.gauss(0.0, 0.003)
        assert abs(graft_coefficient(h1, h2) + graft_coefficient(h2, h1) - 1.0) <= 0.01 + 1e-12


@pytest.mark.parametrize("a", [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
def test_range_after_rounding(a: float) -> None:
    rng = random.Random(3)
    low, high = round(0.5 - a / 2, 2), round(0.5 + a / 2, 2)
    seen = set()
    for _ in range(3000):
        alpha = graft_coefficient(rng.uniform(0, 2.3), rng.uniform(0, 2.3), a=a, c=rng.choice([5.0, 500.0]))
        assert low - 1e-12 <= alpha <= high + 1e-12
        seen.add(alpha)
    # The coefficient really moves across the range (not stuck at 0.5) whenever a > 0.
    assert (len(seen) > 10) == (a > 0)


def test_the_published_numpy_arithmetic_to_the_bit() -> None:
    # round(a / np.pi * np.arctan(c * (h1 - h2)) + 0.5, 2) on numpy floats, as the published code wrote it.
    rng = random.Random(4)
    for _ in range(20000):
        h1 = rng.uniform(0.0, 2.3)
        h2 = h1 + rng.gauss(0.0, rng.choice([0.0005, 0.003, 0.05]))
        a, c = rng.choice([0.0, 0.2, 0.4, 0.6, 1.0]), rng.choice([1, 5, 10, 50, 100, 500])
        assert graft_coefficient(h1, h2, a=a, c=c) == published_coefficient(h1, h2, a, c)
