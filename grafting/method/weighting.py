"""The adaptive weighting coefficient of docs/METHOD.md §3, and the defaults of its hyper-parameters."""

from __future__ import annotations

import math

import numpy as np

from grafting.errors import LIBRARY, UsageError, Wording

__all__ = ["DEFAULT_A", "DEFAULT_C", "graft_coefficient", "graft_coefficients", "check_weighting"]

# The paper's defaults; its a/c study varies them (docs/METHOD.md §8).
DEFAULT_A = 0.4
DEFAULT_C = 500.0


def check_weighting(a: float, c: float, words: Wording = LIBRARY) -> None:
    """Raise :class:`UsageError` unless ``0 <= a <= 1`` and ``c`` is finite and ``>= 0`` (NaN fails both);
    the message names the settings in ``words``."""
    if not 0.0 <= a <= 1.0:
        raise UsageError(f"{words.name('a')} must lie in [0, 1], got {a}")
    if not 0 <= c < math.inf:
        raise UsageError(f"{words.name('c')} must be a finite number >= 0, got {c}")


def graft_coefficient(h_self: float, h_peer: float, a: float = DEFAULT_A, c: float = DEFAULT_C) -> float:
    """``alpha = (a / pi) * arctan(c * (h_self - h_peer)) + 0.5``, rounded to 2 decimals (docs/METHOD.md §3).

    The network whose layer holds more information keeps more of it; alpha lies in
    ``(0.5 - a/2, 0.5 + a/2)``. The arithmetic is the published code's, in float64: numpy's arctan
    (which on some CPUs is numpy's own vectorised routine, not the C library's), then numpy's rounding
    (``alpha * 100`` rounded half to even, divided by 100). One value of :func:`graft_coefficients`.
    """
    return float(graft_coefficients(np.array([h_self]), np.array([h_peer]), a=a, c=c)[0])


def graft_coefficients(
    h_self: np.ndarray, h_peer: np.ndarray, a: float = DEFAULT_A, c: float = DEFAULT_C
) -> np.ndarray:
    """:func:`graft_coefficient` of every pair of scores (float64 arrays) in one go: numpy applies the same
    arctan routine to an array as to a single value, so each is bit for bit the value of its pair alone."""
    alpha = (a / math.pi) * np.arctan(c * (np.asarray(h_self, np.float64) - np.asarray(h_peer, np.float64))) + 0.5
    return np.rint(alpha * 100) / 100
