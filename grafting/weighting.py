"""The adaptive weighting coefficient of METHOD.md §3."""
from __future__ import annotations

import math

__all__ = ["graft_coefficient"]


def graft_coefficient(h_self: float, h_peer: float, a: float = 0.4, c: float = 500.0) -> float:
    """``alpha = (a / pi) * arctan(c * (h_self - h_peer)) + 0.5``, rounded to 2 decimals.

    The network whose layer holds more information keeps more of it; alpha lies in
    ``(0.5 - a/2, 0.5 + a/2)``. Rounding is numpy's (round half to even on ``alpha * 100``), which
    is what the published code applied to its float64 value.
    """
    alpha = (a / math.pi) * math.atan(c * (h_self - h_peer)) + 0.5
    return round(alpha * 100) / 100
