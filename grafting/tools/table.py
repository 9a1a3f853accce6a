"""Formatting results as text: markdown tables and numbers."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = ["markdown", "number"]


def markdown(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A markdown table with ``header`` and one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def number(value: float | None) -> str:
    """``value`` with two decimals, '-' when unknown."""
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"
